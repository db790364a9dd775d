//! Criterion benches of the control channel's framing (`src/peer/`): encoding and decoding
//! messages, and a round trip of frames through `Channel` over an in-memory stream.
//!
//! `cargo bench --bench peer` measures; `cargo test --all-targets` runs each bench once.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use qemu_tls_migrate::peer::{self, Authz, Channel, DestPlan, DiskCopy, DiskSpec, Message};

/// A `preflight` as a source sends it: the largest message of a migration.
fn preflight() -> Message {
    Message::Preflight {
        qmp: "vm1.sock".into(),
        plan: DestPlan {
            machine: None,
            postcopy: false,
            tls: true,
            multifd_compression: None,
            tls_priority: None,
            multifd: None,
            disks: vec![DiskSpec {
                node: "disk0".into(),
                device: Some("virtio-disk0".into()),
                size: 20 << 30,
                copy: DiskCopy::Full,
                backing: None,
            }],
            create_dest_disks: false,
            authz: Authz::FromPeerCert,
            listen_address: "198.18.0.1".into(),
            port_range: qemu_tls_migrate::ports::DEFAULT_RANGE,
        },
    }
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("peer-codec");
    let msg = preflight();
    let frame = peer::encode(&msg).unwrap_or_default();
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode preflight", |b| {
        b.iter(|| peer::encode(black_box(&msg)))
    });
    g.bench_function("decode preflight", |b| {
        b.iter(|| peer::decode(black_box(&frame)))
    });
    let ping = peer::encode(&Message::Ping).unwrap_or_default();
    g.bench_function("decode ping", |b| b.iter(|| peer::decode(black_box(&ping))));
    g.finish();
}

fn channel(c: &mut Criterion) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let mut g = c.benchmark_group("peer-channel");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ping/pong round trip over a duplex", |b| {
        let (a, z) = tokio::io::duplex(64 * 1024);
        let (mut client, mut server) = (Channel::new(a), Channel::new(z));
        b.iter(|| {
            rt.block_on(async {
                let _ = client.send(&Message::Ping).await;
                let _ = server.recv(Duration::from_secs(5)).await;
                let _ = server.send(&Message::Pong).await;
                client.recv(Duration::from_secs(5)).await
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
    targets = codec, channel
}
criterion_main!(benches);
