-- Pages of the buffer pool that hold a tablespace page, with their dirty state.
-- OLDEST_MODIFICATION <> 0: modified in memory and not yet flushed (dirty).
SELECT SPACE, PAGE_NUMBER, OLDEST_MODIFICATION, NEWEST_MODIFICATION
FROM information_schema.INNODB_BUFFER_PAGE
WHERE PAGE_STATE = 'FILE_PAGE'
