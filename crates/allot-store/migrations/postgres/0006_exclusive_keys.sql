-- The exclusion constraint with fixed-size keys. Every hold on a capacity-one resource inserts
-- into this GiST index and searches it; with the resource id as collated text and the span as
-- a timestamp range, choosing the insert path (text penalties, character by character) and
-- comparing keys was about a third of the write session's time under load. Resource ids are
-- UUIDs, spans whole seconds: the same rule over (uuid, int8range) keys, both half-open.
ALTER TABLE claims DROP CONSTRAINT claims_exclusive;
ALTER TABLE claims ADD CONSTRAINT claims_exclusive EXCLUDE USING gist (
    (resource_id::uuid) WITH =,
    int8range(block_start, block_end) WITH &&
) WHERE (exclusive);
