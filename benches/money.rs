//! Parsing decimal amounts at the edge, and formatting them back.

use criterion::{criterion_group, criterion_main, Criterion};
use shardpay_reference::money::{format_minor, Amount, Currency};
use std::hint::black_box;

fn money(c: &mut Criterion) {
    let inr = Currency::parse("INR").unwrap();
    c.bench_function("money_parse_4.50", |b| {
        b.iter(|| Amount::parse(black_box("4.50"), inr).unwrap())
    });
    c.bench_function("money_parse_large", |b| {
        b.iter(|| Amount::parse(black_box("1234567890.12"), inr).unwrap())
    });
    c.bench_function("money_format", |b| {
        b.iter(|| format_minor(black_box(123_456_789_012), inr))
    });
}

criterion_group!(benches, money);
criterion_main!(benches);
