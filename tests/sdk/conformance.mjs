// Drives Zapier's official SDK (@zapier/zapier-sdk) against a Tables API base URL.
// Usage: node conformance.mjs <step> ; input as JSON in $ZSYNC_SDK_INPUT, one JSON result on stdout.
// Steps: write (list fields, create, find with a filter, update, get), find, delete; trigger inboxes:
// inbox-ensure (ensureTriggerInbox twice, listTriggerInboxes by name), inbox-messages (create a record,
// lease, release, lease again, ack, list messages), inbox-delete.
import { createZapierSdk } from "@zapier/zapier-sdk";
import { createZapierSdk as createExperimentalSdk } from "@zapier/zapier-sdk/experimental";

if (process.env.ZSYNC_SDK_TRACE) {
  const real = globalThis.fetch;
  globalThis.fetch = async (url, init) => {
    console.error("FETCH", init?.method || "GET", String(url));
    try { const r = await real(url, init); console.error(" ->", r.status); return r; }
    catch (e) { console.error(" !!", e.message); throw e; }
  };
  process.on("exit", (c) => console.error("EXIT", c));
}
const input = JSON.parse(process.env.ZSYNC_SDK_INPUT);
const step = process.argv[2];
// The inbox methods are experimental (their own entry point, which has the Tables methods too). One SDK
// instance per process: two instances racing for a token left one request unsent.
const create = step.startsWith("inbox") ? createExperimentalSdk : createZapierSdk;
const zapier = create({
  baseUrl: input.baseUrl,
  // For a base URL that is not a zapier.com host the SDK would send the token request to zapier.com:
  // the credentials name the token endpoint's base URL themselves.
  credentials: { clientId: input.clientId, clientSecret: input.clientSecret, baseUrl: input.baseUrl },
});
const table = input.tableId;

async function find(id) {
  const page = await zapier.listTableRecords({
    table, filters: [{ fieldKey: "id", operator: "exact", value: id }],
  });
  return page.data;
}

// The SDK's telemetry catches an uncaught error and exits 0: catch it here, say what it was, exit 1.
let out;
try {
  if (step === "write") {
    const { data: fields } = await zapier.listTableFields({ table });
    const { data: created } = await zapier.createTableRecords({ table, records: [{ data: input.record }] });
    const found = await find(input.record.id);
    const { data: updated } = await zapier.updateTableRecords({
      table, records: [{ id: created[0].id, data: input.update }],
    });
    const { data: got } = await zapier.getTableRecord({ table, record: created[0].id });
    out = { fields, created, found, updated, got };
  } else if (step === "find") {
    out = { found: await find(input.id) };
  } else if (step === "delete") {
    await zapier.deleteTableRecords({ table, records: [input.recordId] });
    out = { deleted: input.recordId, found: await find(input.id) };
  } else if (step === "inbox-ensure") {
    const z = zapier;
    const spec = { name: input.name, app: input.app, action: input.action, inputs: { table_id: table },
                   ...(input.notificationUrl ? { notificationUrl: input.notificationUrl } : {}) };
    const { data: first } = await z.ensureTriggerInbox(spec);
    const { data: again } = await z.ensureTriggerInbox(spec);
    const { data: listed } = await z.listTriggerInboxes({ name: input.name });
    out = { first, again, listed };
  } else if (step === "inbox-messages") {
    const z = zapier;
    const { data: created } = await zapier.createTableRecords({ table, records: [{ data: input.record }] });
    const { data: lease1 } = await z.leaseTriggerInboxMessages({ inbox: input.name, leaseLimit: 10, leaseSeconds: 60 });
    const { data: released } = await z.releaseTriggerInboxMessages({ inbox: input.name, lease: lease1.lease_id });
    const { data: lease2 } = await z.leaseTriggerInboxMessages({ inbox: input.name, leaseLimit: 10 });
    const { data: listedLeased } = await z.listTriggerInboxMessages({ inbox: input.name });
    const { data: acked } = await z.ackTriggerInboxMessages({ inbox: input.name, lease: lease2.lease_id });
    const { data: listedAfter } = await z.listTriggerInboxMessages({ inbox: input.name });
    out = { created, lease1, released, lease2, listedLeased, acked, listedAfter };
  } else if (step === "inbox-delete") {
    const z = zapier;
    await z.deleteTriggerInbox({ inbox: input.name });
    const { data: listed } = await z.listTriggerInboxes({ name: input.name });
    out = { listed };
  } else {
    throw new Error(`unknown step ${step}`);
  }
} catch (err) {
  process.stderr.write(`SDK step ${step} failed: ${err?.name}: ${err?.message}\n${err?.stack ?? ""}\n`);
  process.exit(1);
}
process.stdout.write(JSON.stringify(out));
