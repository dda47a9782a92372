-- Every read of claims by resource now goes through `claim_totals` (the capacity rule, seat
-- maps, the in-use checks before deleting a resource or venue), which the triggers keep with
-- the same rows. The index on `claims (resource_id, block_start)` only cost each hold an insert
-- into a leaf page chosen by its resource: with many resources, one more page written to the
-- WAL per hold (and a delete per release).
DROP INDEX claims_resource;
