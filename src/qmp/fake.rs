//! A fake QMP peer over an in-memory stream, for unit tests and benches of code above the
//! protocol: protocol edge cases a real QEMU cannot be made to produce on cue, and the order of
//! commands a caller sends. Never a stand-in for QEMU in integration tests.
//!
//! Two ways to use it: script the conversation line by line ([`FakeQemu::send`],
//! [`FakeQemu::recv`]), or hand it to [`FakeQemu::answer_all`], which answers every command with
//! what a closure returns and records the commands in order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, ReadHalf, WriteHalf};

use super::{Qmp, QmpError};

/// The peer side of a QMP conversation.
#[derive(Debug)]
pub struct FakeQemu {
    lines: tokio::io::Lines<BufReader<ReadHalf<DuplexStream>>>,
    write: WriteHalf<DuplexStream>,
}

/// The commands a fake peer received, in order: `(name, arguments)`.
pub type Received = Arc<Mutex<Vec<(String, Value)>>>;

impl FakeQemu {
    /// Sends one JSON message.
    pub async fn send(&mut self, v: Value) -> std::io::Result<()> {
        self.send_raw(&v.to_string()).await
    }

    /// Sends one line as it is (garbage included).
    pub async fn send_raw(&mut self, line: &str) -> std::io::Result<()> {
        self.write.write_all(format!("{line}\r\n").as_bytes()).await
    }

    /// Sends raw bytes, no line ending added.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write.write_all(bytes).await
    }

    /// The next JSON message from the client; `None` when it closed or sent something else.
    pub async fn recv(&mut self) -> Option<Value> {
        let line = self.lines.next_line().await.ok()??;
        serde_json::from_str(&line).ok()
    }

    /// Answers every command until the client goes: `{"return": answer(name, arguments)}`, or
    /// an error reply when `answer` returns `Err(desc)`. Returns the record of what was asked.
    pub fn answer_all(
        self,
        answer: impl Fn(&str, &Value) -> Result<Value, String> + Send + 'static,
    ) -> Received {
        self.answer_some(move |name, args| Some(answer(name, args)))
    }

    /// [`FakeQemu::answer_all`], but a command for which `answer` returns `None` gets no reply
    /// at all (a reply lost on the way, or a QEMU that never answers).
    pub fn answer_some(
        mut self,
        answer: impl Fn(&str, &Value) -> Option<Result<Value, String>> + Send + 'static,
    ) -> Received {
        let received: Received = Arc::default();
        let record = received.clone();
        tokio::spawn(async move {
            while let Some(cmd) = self.recv().await {
                let name = cmd["execute"].as_str().unwrap_or_default().to_string();
                let args = cmd.get("arguments").cloned().unwrap_or(Value::Null);
                if let Ok(mut r) = record.lock() {
                    r.push((name.clone(), args.clone()));
                }
                let reply = match answer(&name, &args) {
                    None => continue,
                    Some(Ok(ret)) => json!({"return": ret, "id": cmd["id"]}),
                    Some(Err(desc)) => {
                        json!({"error": {"class": "GenericError", "desc": desc}, "id": cmd["id"]})
                    }
                };
                if self.send(reply).await.is_err() {
                    return;
                }
            }
        });
        received
    }
}

/// A client connected to a fake QEMU 7.2 through the real handshake, offering
/// `capabilities` in the greeting.
pub async fn connect(capabilities: Value, timeout: Duration) -> Result<(Qmp, FakeQemu), QmpError> {
    let (client, server) = tokio::io::duplex(1 << 20);
    let (sr, sw) = tokio::io::split(server);
    let mut fake = FakeQemu {
        lines: BufReader::new(sr).lines(),
        write: sw,
    };
    let (cr, cw) = tokio::io::split(client);
    let handshake = tokio::spawn(Qmp::handshake("fake".into(), cr, cw, timeout));
    let greeting = json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22},
        "package": ""}, "capabilities": capabilities}});
    let closed = |reason: &str| QmpError::Closed {
        peer: "fake".into(),
        reason: reason.into(),
    };
    fake.send(greeting)
        .await
        .map_err(|_| closed("greeting not sent"))?;
    let caps = fake
        .recv()
        .await
        .ok_or_else(|| closed("no qmp_capabilities"))?;
    fake.send(json!({"return": {}, "id": caps["id"]}))
        .await
        .map_err(|_| closed("capabilities reply not sent"))?;
    let qmp = handshake
        .await
        .map_err(|_| closed("handshake task failed"))??;
    Ok((qmp, fake))
}

/// A fake peer built without the handshake, for tests of the handshake itself.
pub fn raw() -> (ReadHalf<DuplexStream>, WriteHalf<DuplexStream>, FakeQemu) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (sr, sw) = tokio::io::split(server);
    let fake = FakeQemu {
        lines: BufReader::new(sr).lines(),
        write: sw,
    };
    let (cr, cw) = tokio::io::split(client);
    (cr, cw, fake)
}
