-- Run once by the MySQL image when shard0's data volume is new: the auth
-- service keeps its users and account owners in database shardpay_auth
-- beside shard 0 (the default with --mysql-urls), which every auth
-- replica shares; the shardpay user may create its tables there.
CREATE DATABASE IF NOT EXISTS shardpay_auth CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
GRANT ALL PRIVILEGES ON shardpay_auth.* TO 'shardpay'@'%';
