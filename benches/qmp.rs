//! Criterion benches of the tool's own QMP hot paths: decoding `query-migrate` replies (polled
//! every 250 ms during a migration), encoding commands, and the client's event and reply
//! dispatch over the shared in-memory fake QEMU (`qmp::fake`).
//!
//! `cargo bench --bench qmp` measures; `cargo test --all-targets` runs each bench once.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use qemu_tls_migrate::qemu::{MigrateSetParameters, MigrationInfo, QueryMigrate};
use qemu_tls_migrate::qmp::{Command, fake};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(5);
/// Events per dispatch iteration.
const EVENT_BATCH: u64 = 100;

/// A `query-migrate` reply of QEMU 7.2 in the middle of a TLS migration, as sent on the wire.
fn query_migrate_reply(id: u64) -> String {
    json!({"return": {
        "expected-downtime": 300, "status": "active", "setup-time": 12, "total-time": 1834,
        "ram": {"total": 1074069504u64, "postcopy-requests": 0, "dirty-sync-count": 2,
                "multifd-bytes": 0, "pages-per-second": 91254, "downtime-bytes": 0,
                "page-size": 4096, "remaining": 402653184u64, "postcopy-bytes": 0,
                "mbps": 2990.21, "transferred": 712423914u64, "dirty-sync-missed-zero-copy": 0,
                "precopy-bytes": 712423914u64, "duplicate": 98304, "dirty-pages-rate": 25102,
                "skipped": 0, "normal-bytes": 705970176u64, "normal": 172356}},
        "id": id})
    .to_string()
}

fn migration_pass_event(pass: u64) -> String {
    json!({"timestamp": {"seconds": 1700000000u64, "microseconds": 123456},
           "event": "MIGRATION_PASS", "data": {"pass": pass}})
    .to_string()
}

/// The wire form of a command, as the client writes it.
fn request<C: Command>(cmd: &C, id: u64) -> String {
    let mut v = json!({"execute": C::NAME, "id": id});
    let args = serde_json::to_value(cmd).unwrap_or(Value::Null);
    if args.as_object().is_some_and(|o| !o.is_empty()) {
        v["arguments"] = args;
    }
    v.to_string()
}

fn codec(c: &mut Criterion) {
    let reply = query_migrate_reply(7);
    let mut g = c.benchmark_group("qmp-codec");
    g.throughput(Throughput::Bytes(reply.len() as u64));
    g.bench_function("decode query-migrate reply", |b| {
        b.iter(|| {
            let v: Value = serde_json::from_str(black_box(&reply)).expect("JSON");
            let info: MigrationInfo =
                serde_json::from_value(v["return"].clone()).expect("MigrationInfo");
            black_box(info.ram.map(|r| r.transferred))
        })
    });
    let params = MigrateSetParameters {
        tls_creds: Some("qtm-tls-4242-1".into()),
        tls_hostname: Some("dst-host".into()),
        max_bandwidth: Some(i64::MAX as u64),
        downtime_limit: Some(300),
        multifd_channels: Some(4),
        ..Default::default()
    };
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode migrate-set-parameters", |b| {
        b.iter(|| black_box(request(black_box(&params), 42)))
    });
    g.bench_function("encode query-migrate", |b| {
        b.iter(|| black_box(request(&QueryMigrate, black_box(43))))
    });
    g.finish();
}

fn dispatch(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (qmp, mut fake) = rt
        .block_on(fake::connect(json!([]), TIMEOUT))
        .expect("fake QEMU");
    let mut events = qmp.subscribe();
    let batch: String = (0..EVENT_BATCH)
        .map(|i| migration_pass_event(i) + "\r\n")
        .collect();

    let mut g = c.benchmark_group("qmp-dispatch");
    g.throughput(Throughput::Elements(EVENT_BATCH));
    g.bench_function("events to a subscriber", |b| {
        b.iter(|| {
            rt.block_on(async {
                fake.send_bytes(batch.as_bytes())
                    .await
                    .expect("fake peer write");
                for _ in 0..EVENT_BATCH {
                    let e = events.next().await.expect("event");
                    black_box(e);
                }
            })
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("query-migrate round trip", |b| {
        b.iter(|| {
            rt.block_on(async {
                let call = qmp.call_timeout(&QueryMigrate, TIMEOUT);
                let answer = async {
                    let req = fake.recv().await.expect("a request");
                    let id = req["id"].as_u64().expect("numeric id");
                    fake.send_raw(&query_migrate_reply(id))
                        .await
                        .expect("fake peer write");
                };
                let (info, ()) = tokio::join!(call, answer);
                black_box(info.expect("reply"))
            })
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = codec, dispatch
}
criterion_main!(benches);
