//! A raw WebSocket client for the integration tests, one that can also break the rules
//! (unmasked or fragmented frames, bad opcodes): shared by tests/websocket.rs and
//! tests/cluster.rs.

use super::find;
use ringgate::ws::frame::{self, op};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub struct Ws {
    pub s: TcpStream,
    pub buf: Vec<u8>,
}

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Sends an upgrade request; returns the response head and the client.
pub fn ws_connect(addr: SocketAddr, path: &str, extra: &str) -> (String, Ws) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_nodelay(true).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: chat.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .unwrap();
    let mut ws = Ws { s, buf: Vec::new() };
    let end = loop {
        if let Some(i) = find(&ws.buf, b"\r\n\r\n") {
            break i + 4;
        }
        let mut tmp = [0u8; 4096];
        let n = ws.s.read(&mut tmp).unwrap();
        assert!(n > 0, "closed during handshake");
        ws.buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&ws.buf[..end]).to_string();
    ws.buf.drain(..end);
    (head, ws)
}

pub fn open(addr: SocketAddr, path: &str) -> Ws {
    let (head, ws) = ws_connect(addr, path, "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    ws
}

impl Ws {
    pub fn send_raw(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    pub fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut f = Vec::new();
        frame::encode(&mut f, opcode, fin, payload);
        if masked {
            let key = [0x11, 0x22, 0x33, 0x44];
            let hl = f.len() - payload.len();
            f[1] |= 0x80;
            let mut p = f.split_off(hl);
            frame::unmask_bytewise(&mut p, key);
            f.extend_from_slice(&key);
            f.extend_from_slice(&p);
        }
        f
    }

    pub fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.send_raw(&Ws::frame(fin, opcode, payload, true));
    }

    pub fn text(&mut self, s: &str) {
        self.send(true, op::TEXT, s.as_bytes());
    }

    /// Reads one frame: (fin, opcode, payload). None on EOF or timeout.
    pub fn read_frame(&mut self) -> Option<(bool, u8, Vec<u8>)> {
        loop {
            if let Ok(Some(h)) = frame::parse_header(&self.buf) {
                assert!(h.mask.is_none(), "server frames are not masked");
                let total = h.header_len + h.len as usize;
                if self.buf.len() >= total {
                    let p = self.buf[h.header_len..total].to_vec();
                    self.buf.drain(..total);
                    return Some((h.fin, h.opcode, p));
                }
            }
            let mut tmp = [0u8; 65536];
            match self.s.read(&mut tmp) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// The next data message as a string (skips pongs).
    pub fn recv_text(&mut self) -> String {
        loop {
            let (fin, opc, p) = self.read_frame().expect("a message");
            assert!(fin);
            match opc {
                op::TEXT => return String::from_utf8(p).unwrap(),
                op::PONG => continue,
                o => panic!("unexpected opcode {o}: {:?}", String::from_utf8_lossy(&p)),
            }
        }
    }

    /// Expects a close frame; returns its code.
    pub fn expect_close(&mut self) -> u16 {
        loop {
            let (_, opc, p) = self.read_frame().expect("a close frame");
            if opc == op::CLOSE {
                assert!(p.len() >= 2, "close without a code");
                return u16::from_be_bytes([p[0], p[1]]);
            }
        }
    }

    /// Whether the server closed the TCP connection within 5 s.
    pub fn eof(&mut self) -> bool {
        let mut tmp = [0u8; 1024];
        loop {
            match self.s.read(&mut tmp) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// The server side of a handshake, for test backends: reads the upgrade request head from `s`
/// (bytes after it stay in `buf`). `None` when the client went away first.
pub fn read_upgrade(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    super::read_head(s, buf)
}

/// Answers the upgrade request `head` with 101 and `extra` header lines (each ending in CRLF).
pub fn answer_upgrade(s: &mut impl Write, head: &str, extra: &str) {
    let key = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let accept = ringgate::ws::handshake::accept_key(key.as_bytes());
    let _ = write!(
        s,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
    );
}
