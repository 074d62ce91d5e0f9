//! Account-to-shard lookup: XXH3 of the id plus jump consistent hashing.

use criterion::{criterion_group, criterion_main, Criterion};
use shardpay_reference::ids::AccountId;
use shardpay_reference::sharding::Ring;
use std::hint::black_box;

fn ring_lookup(c: &mut Criterion) {
    let ids: Vec<AccountId> = (0..1024)
        .map(|i| AccountId::parse(&format!("user_{i}")).unwrap())
        .collect();
    for shards in [4u32, 64] {
        let ring = Ring::new(shards).unwrap();
        c.bench_function(&format!("ring_lookup_{shards}_shards"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(ring.shard_of(black_box(&ids[i])))
            })
        });
    }
}

criterion_group!(benches, ring_lookup);
criterion_main!(benches);
