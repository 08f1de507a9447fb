// Drives Zapier's official SDK (@zapier/zapier-sdk) against a Tables API base URL.
// Usage: node conformance.mjs <step> ; input as JSON in $ZSYNC_SDK_INPUT, one JSON result on stdout.
// Steps: write (list fields, create, find with a filter, update, get), find, delete.
import { createZapierSdk } from "@zapier/zapier-sdk";

const input = JSON.parse(process.env.ZSYNC_SDK_INPUT);
const zapier = createZapierSdk({
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

const step = process.argv[2];
let out;
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
} else {
  throw new Error(`unknown step ${step}`);
}
process.stdout.write(JSON.stringify(out));
