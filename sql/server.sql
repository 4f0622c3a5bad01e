-- Server facts the guest agent needs: page size and buffer pool size
-- (the same variables in MariaDB, MySQL and Percona).
SELECT @@innodb_page_size, @@innodb_buffer_pool_size
