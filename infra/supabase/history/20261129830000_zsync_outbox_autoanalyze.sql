-- zsync.outbox is a queue: a burst adds thousands of pending entries and the drain acknowledges them within
-- seconds. With the default thresholds (10 % of the table) its statistics can lag far behind, and a claim
-- planned on statistics taken mid-burst may walk the primary key instead of outbox_pending_table_id_idx
-- (~7 ms per delivery until autoanalyze runs; seen in bench/singlepath.py). Analyze and vacuum it after a
-- fixed number of changed rows instead, as is usual for queue tables.
ALTER TABLE zsync.outbox SET (
    autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 2000,
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000
);
