-- Server facts the guest agent needs: page size, data directory, buffer pool size.
SELECT @@innodb_page_size, @@datadir, @@innodb_buffer_pool_size
