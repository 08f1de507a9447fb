-- zsync: the set-based batch of Tables deliveries runs as zsync_sync again.
--
-- 20261206200201 made zsync.sync_apply_many_set (which runs as its caller, zsync_sync) call zsync.stamp_race()
-- and zsync.overwritten_by() (which calls zsync.edit_holds), and revoked all three from PUBLIC without granting
-- them to zsync_sync. Every batch of more than zsync.small_batch deliveries then failed with "permission denied
-- for function stamp_race" (Postgres checks a function's privilege when the query starts, whichever branch
-- runs): the inbox released its messages, smaller batches (the row path, SECURITY DEFINER) took them in later,
-- and some went past the poison limit to the dead-letter queue (a soak: 3 dead-lettered, convergence 340 s).
-- The three read no table: they compare the JSON they are given. Re-runnable.
GRANT EXECUTE ON FUNCTION zsync.stamp_race() TO zsync_sync;
GRANT EXECUTE ON FUNCTION zsync.edit_holds(regclass, jsonb, jsonb, jsonb) TO zsync_sync;
GRANT EXECUTE ON FUNCTION zsync.overwritten_by(regclass, jsonb, jsonb, timestamp with time zone) TO zsync_sync;
