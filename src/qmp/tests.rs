//! Protocol edge cases against a scripted fake peer: the cases a real QEMU cannot be made to
//! produce on demand (late replies, garbage, a peer that vanishes mid-command).

use super::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);

/// The shared fake peer, failing the test on a broken conversation.
struct FakeQemu(fake::FakeQemu);

impl FakeQemu {
    async fn send(&mut self, v: Value) {
        self.0.send(v).await.expect("fake peer write");
    }

    async fn send_raw(&mut self, line: &str) {
        self.0.send_raw(line).await.expect("fake peer write");
    }

    async fn recv(&mut self) -> Value {
        self.0.recv().await.expect("the client sent JSON")
    }
}

async fn connect_with(capabilities: Value) -> (Qmp, FakeQemu) {
    let (qmp, peer) = fake::connect(capabilities, T).await.expect("handshake");
    (qmp, FakeQemu(peer))
}

async fn connect() -> (Qmp, FakeQemu) {
    connect_with(json!([])).await
}

#[tokio::test]
async fn handshake_reads_version_and_enables_oob_when_offered() {
    let (qmp, _fake) = connect().await;
    assert_eq!(qmp.greeting().version.qemu.major, 7);
    assert!(!qmp.greeting().offers_oob());

    let (cr, cw, peer) = fake::raw();
    let mut fake = FakeQemu(peer);
    let handshake = tokio::spawn(Qmp::handshake("fake".into(), cr, cw, T));
    fake.send(json!({"QMP": {"version": {}, "capabilities": ["oob"]}}))
        .await;
    let caps = fake.recv().await;
    assert_eq!(caps["arguments"]["enable"], json!(["oob"]));
    fake.send(json!({"return": {}, "id": caps["id"]})).await;
    handshake.await.expect("join").expect("handshake");
}

#[tokio::test]
async fn replies_are_matched_by_id_when_they_come_out_of_order() {
    let (qmp, mut fake) = connect().await;
    let a = tokio::spawn({
        let q = qmp.clone();
        async move { q.execute_raw("cmd-a", None, T).await }
    });
    let first = fake.recv().await;
    let b = tokio::spawn({
        let q = qmp.clone();
        async move { q.execute_raw("cmd-b", None, T).await }
    });
    let second = fake.recv().await;
    fake.send(json!({"return": "b", "id": second["id"]})).await;
    fake.send(json!({"return": "a", "id": first["id"]})).await;
    assert_eq!(first["execute"], "cmd-a");
    assert_eq!(a.await.expect("join").expect("a"), json!("a"));
    assert_eq!(b.await.expect("join").expect("b"), json!("b"));
}

#[tokio::test]
async fn a_timed_out_command_does_not_poison_the_next_one() {
    let (qmp, mut fake) = connect().await;
    let err = tokio::join!(
        qmp.execute_raw("slow", None, Duration::from_millis(50)),
        fake.recv()
    )
    .0
    .expect_err("times out");
    assert!(err.is_timeout(), "{err}");

    let next = tokio::spawn({
        let q = qmp.clone();
        async move { q.execute_raw("fast", None, T).await }
    });
    let fast = fake.recv().await;
    // The late reply to "slow" arrives first; it must not answer "fast".
    fake.send(json!({"return": "late", "id": fast["id"].as_u64().expect("id") - 1}))
        .await;
    fake.send(json!({"return": "fast", "id": fast["id"]})).await;
    assert_eq!(next.await.expect("join").expect("fast"), json!("fast"));
}

#[tokio::test]
async fn qemu_errors_carry_class_and_description() {
    let (qmp, mut fake) = connect().await;
    let call = tokio::spawn({
        let q = qmp.clone();
        async move { q.execute_raw("object-add", None, T).await }
    });
    let req = fake.recv().await;
    fake.send(json!({"error": {"class": "GenericError", "desc": "Unable to access credentials /x/ca-cert.pem"}, "id": req["id"]}))
        .await;
    let err = call.await.expect("join").expect_err("error reply");
    assert_eq!(
        err.qemu_error(),
        Some((
            "GenericError",
            "Unable to access credentials /x/ca-cert.pem"
        ))
    );
    assert!(err.to_string().contains("object-add"), "{err}");
}

#[tokio::test]
async fn events_between_replies_are_all_delivered_including_unknown_ones() {
    let (qmp, mut fake) = connect().await;
    let mut events = qmp.subscribe();
    let call = tokio::spawn({
        let q = qmp.clone();
        async move { q.execute_raw("query-status", None, T).await }
    });
    let req = fake.recv().await;
    fake.send(json!({"event": "MIGRATION", "data": {"status": "setup"}, "timestamp": {"seconds": 1, "microseconds": 2}}))
        .await;
    fake.send(json!({"event": "SOME_FUTURE_EVENT", "data": {"new-field": [1, 2]}}))
        .await;
    fake.send(
        json!({"return": {"status": "running", "running": true, "unknown": 1}, "id": req["id"]}),
    )
    .await;
    fake.send(json!({"event": "MIGRATION", "data": {"status": "a-status-from-the-future"}}))
        .await;
    call.await.expect("join").expect("reply");
    let names: Vec<String> = [
        events.next().await,
        events.next().await,
        events.next().await,
    ]
    .into_iter()
    .map(|e| e.expect("event").event)
    .collect();
    assert_eq!(names, ["MIGRATION", "SOME_FUTURE_EVENT", "MIGRATION"]);
}

#[tokio::test]
async fn garbage_fails_pending_and_later_commands() {
    let (qmp, mut fake) = connect().await;
    let call = tokio::spawn({
        let q = qmp.clone();
        async move { q.execute_raw("query-status", None, T).await }
    });
    let _ = fake.recv().await;
    fake.send_raw("this is not json {").await;
    let err = call.await.expect("join").expect_err("garbage");
    assert!(err.is_closed(), "{err}");
    let later = qmp.execute_raw("query-status", None, T).await;
    assert!(later.expect_err("closed").is_closed());
    assert!(!qmp.is_open());
}

#[tokio::test]
async fn a_closed_socket_ends_commands_and_event_streams() {
    let (qmp, mut fake) = connect().await;
    let mut events = qmp.subscribe();
    let call = tokio::spawn({
        let q = qmp.clone();
        async move { q.execute_raw("query-migrate", None, T).await }
    });
    let _ = fake.recv().await;
    drop(fake);
    let err = call.await.expect("join").expect_err("closed");
    assert!(err.is_closed(), "{err}");
    assert!(events.next().await.is_none());
}

#[tokio::test]
async fn a_peer_that_never_greets_times_out() {
    let (client, _server) = tokio::io::duplex(64);
    let (cr, cw) = tokio::io::split(client);
    let err = Qmp::handshake("silent".into(), cr, cw, Duration::from_millis(50))
        .await
        .expect_err("no greeting");
    assert!(err.is_timeout(), "{err}");
}

#[tokio::test]
async fn a_peer_that_is_not_qemu_is_refused() {
    let (client, server) = tokio::io::duplex(4096);
    let (_sr, mut sw) = tokio::io::split(server);
    let (cr, cw) = tokio::io::split(client);
    sw.write_all(b"SSH-2.0-OpenSSH_9.2\r\n")
        .await
        .expect("write");
    let err = Qmp::handshake("ssh".into(), cr, cw, T)
        .await
        .expect_err("not QMP");
    assert!(matches!(err, QmpError::Protocol { .. }), "{err}");
}

#[tokio::test]
async fn an_endless_line_is_an_error_not_unbounded_memory() {
    let (qmp, mut fake) = connect().await;
    let call = tokio::spawn({
        let q = qmp.clone();
        async move { q.execute_raw("query-status", None, T).await }
    });
    let _ = fake.recv().await;
    // The client stops reading once the line is too long, so the writer may block: it runs on
    // its own and is abandoned.
    let _writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 1024 * 1024];
        for _ in 0..(MAX_LINE / chunk.len() + 1) {
            if fake.0.send_bytes(&chunk).await.is_err() {
                break;
            }
        }
    });
    let err = call.await.expect("join").expect_err("too long");
    assert!(err.is_closed(), "{err}");
}

#[tokio::test]
async fn exec_oob_is_used_only_when_offered() {
    #[derive(Serialize)]
    struct Pause;
    impl Command for Pause {
        const NAME: &'static str = "migrate-pause";
        type Output = Value;
    }
    let (qmp, mut fake) = connect_with(json!(["oob"])).await;
    let call = tokio::spawn({
        let q = qmp.clone();
        async move { q.call_oob(&Pause, T).await }
    });
    let req = fake.recv().await;
    assert_eq!(req["exec-oob"], "migrate-pause");
    assert!(req.get("arguments").is_none());
    fake.send(json!({"return": {}, "id": req["id"]})).await;
    call.await.expect("join").expect("oob reply");
}

#[tokio::test]
async fn a_command_with_a_duration_max_timeout_gets_its_reply_without_panicking() {
    #[derive(Serialize)]
    struct QueryStatus;
    impl Command for QueryStatus {
        const NAME: &'static str = "query-status";
        type Output = Value;
    }
    let (qmp, mut fake) = connect().await;
    let call = tokio::spawn({
        let q = qmp.clone();
        async move { q.call_timeout(&QueryStatus, Duration::MAX).await }
    });

    // Before the fix the call panicked computing its deadline and never reached the peer.
    let req = tokio::time::timeout(T, fake.recv())
        .await
        .expect("the command reaches the peer");
    fake.send(json!({"return": {"status": "running"}, "id": req["id"]}))
        .await;

    let reply = call.await.expect("the call does not panic").expect("reply");
    assert_eq!(reply["status"], "running");
}

/// A command with a descriptor: the peer gets the line and the descriptor with it, and a
/// stream that is not a Unix socket refuses at once.
#[tokio::test]
async fn a_descriptor_rides_with_its_command_over_a_unix_socket() {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd, FromRawFd};

    #[derive(Serialize)]
    struct GetFd {
        fdname: &'static str,
    }
    impl Command for GetFd {
        const NAME: &'static str = "getfd";
        type Output = Value;
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("qmp.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let peer = std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        let (mut s, _) = listener.accept().expect("accept");
        s.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, \"minor\": 2, \"micro\": 0}, \"package\": \"\"}, \"capabilities\": []}}\n")
            .expect("greet");
        let mut reader = BufReader::new(s.try_clone().expect("clone"));
        let mut caps = String::new();
        reader.read_line(&mut caps).expect("capabilities");
        let id = serde_json::from_str::<Value>(&caps).expect("json")["id"].clone();
        s.write_all(format!("{}\n", json!({"return": {}, "id": id})).as_bytes())
            .expect("reply");
        // The getfd line, read with its descriptor.
        let mut buf = vec![0u8; 4096];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
            .expect("recvmsg");
        let mut fds = vec![];
        for c in msg.cmsgs().expect("cmsgs") {
            if let ControlMessageOwned::ScmRights(r) = c {
                fds.extend(r);
            }
        }
        let n = msg.bytes;
        let mut line = String::from_utf8_lossy(&buf[..n]).to_string();
        if !line.ends_with('\n') {
            reader.read_line(&mut line).expect("rest of the line");
        }
        let cmd: Value = serde_json::from_str(line.trim()).expect("json");
        assert_eq!(fds.len(), 1, "one descriptor with {line}");
        // SAFETY: received just now, ours to close.
        let got = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        s.write_all(format!("{}\n", json!({"return": {}, "id": cmd["id"]})).as_bytes())
            .expect("reply");
        (cmd, got.metadata().expect("fstat").len())
    });
    let qmp = Qmp::connect(&path, T).await.expect("connect");
    assert!(qmp.can_pass_fds());
    assert_eq!(qmp.peer_pid(), Some(std::process::id()));
    let mut file = tempfile::tempfile().expect("tempfile");
    std::io::Write::write_all(&mut file, b"12345").expect("write");
    qmp.call_with_fd(&GetFd { fdname: "x" }, file.as_fd(), T)
        .await
        .expect("getfd");
    let (cmd, len) = peer.join().expect("peer");
    assert_eq!(cmd["execute"], "getfd");
    assert_eq!(cmd["arguments"]["fdname"], "x");
    assert_eq!(len, 5, "the peer got this very file");

    let (qmp, _fake) = connect().await;
    assert!(!qmp.can_pass_fds());
    let refused = qmp
        .call_with_fd(&GetFd { fdname: "x" }, file.as_fd(), T)
        .await;
    assert!(
        matches!(refused, Err(QmpError::Protocol { .. })),
        "{refused:?}"
    );
}
