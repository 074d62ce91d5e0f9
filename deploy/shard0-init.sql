-- Run once by the MySQL image when shard0's data volume is new: the auth
-- service keeps its users and account owners in database shardpay_auth
-- beside shard 0, and the notification service its webhooks, deliveries
-- and dead letters in shardpay_notify (the defaults with --mysql-urls),
-- which every replica of each shares; the shardpay user may create their
-- tables there.
CREATE DATABASE IF NOT EXISTS shardpay_auth CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
GRANT ALL PRIVILEGES ON shardpay_auth.* TO 'shardpay'@'%';
CREATE DATABASE IF NOT EXISTS shardpay_notify CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
GRANT ALL PRIVILEGES ON shardpay_notify.* TO 'shardpay'@'%';
