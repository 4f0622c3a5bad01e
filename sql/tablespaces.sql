-- Which file holds each tablespace (FILENAME is relative to @@datadir when it starts with './').
SELECT SPACE, FILENAME FROM information_schema.INNODB_SYS_TABLESPACES
