-- 008_batch_clock_times: a batch's finished_at is the moment its last job finished.
--
-- `now()` is the start of the transaction; `clock_timestamp()` is the moment of the write.
-- A batch's `finished_at` is written as the transaction finishing its last job commits (a
-- deferred trigger): with the clock it is never before any of its jobs' `finished_at`.
-- The function body is 004_batches' with only the time source changed (CREATE OR REPLACE
-- keeps owner and privileges). Databases from before the plug-in split ran this as part
-- of the former 008_clock_times, whose learning half the learning plug-in now owns: running
-- it again replaces the function with itself.


CREATE OR REPLACE FUNCTION jobvisor.apply_batch_tally() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_now   timestamptz := clock_timestamp();
    v_tally text := current_setting('jobvisor.batch_tally', true);
    v_id    text;
    v_d     jsonb;
    v_done  int;
    b       jobvisor.batches;
BEGIN
    -- The first deferred event of the transaction applies everything; the rest find the
    -- tally empty.
    IF coalesce(v_tally, '') = '' THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('jobvisor.batch_tally', '', true);
    -- In id order: two transactions touching the same batches lock them in one order.
    FOR v_id, v_d IN SELECT key, value FROM jsonb_each(v_tally::jsonb) ORDER BY key LOOP
        v_done := (v_d ->> 0)::int + (v_d ->> 1)::int + (v_d ->> 2)::int;
        UPDATE jobvisor.batches AS x
        SET completed = x.completed + (v_d ->> 0)::int,
            failed = x.failed + (v_d ->> 1)::int,
            cancelled = x.cancelled + (v_d ->> 2)::int,
            finished_at = CASE WHEN x.completed + x.failed + x.cancelled + v_done = x.total
                               THEN coalesce(x.finished_at, v_now) END,
            updated_at = v_now
        WHERE x.id = v_id
        RETURNING x.* INTO b;
        -- Finished by this transaction: it was short of its total before.
        IF FOUND AND b.finished_at IS NOT NULL AND b.callback_url IS NOT NULL
           AND b.completed + b.failed + b.cancelled - v_done < b.total THEN
            PERFORM jobvisor.enqueue_webhook(
                'webhook:batch:' || b.id, b.callback_url,
                jsonb_build_object(
                    'event', 'batch.finished',
                    'batch', jsonb_build_object(
                        'id', b.id, 'total', b.total, 'completed', b.completed,
                        'failed', b.failed, 'cancelled', b.cancelled,
                        'created_at', b.created_at, 'finished_at', b.finished_at)));
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

