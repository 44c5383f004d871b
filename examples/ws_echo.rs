//! A WebSocket echo server for perf runs (`perf/ws.sh`): one monoio thread, echoes every data
//! frame back unmasked, answers pings, echoes the close. Not part of the gateway.
//!
//! Usage: `ws_echo PORT`

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use ringgate::ws::frame::{self, op};

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: ws_echo PORT");
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let l = TcpListener::bind(("127.0.0.1", port)).expect("bind");
        loop {
            if let Ok((s, _)) = l.accept().await {
                let _ = s.set_nodelay(true);
                monoio::spawn(conn(s));
            }
        }
    });
}

async fn read_more(s: &mut TcpStream, mut buf: Vec<u8>) -> (usize, Vec<u8>) {
    if buf.capacity() - buf.len() < 2048 {
        buf.reserve(buf.capacity().max(4096));
    }
    let len = buf.len();
    let cap = buf.capacity();
    let (r, b) = s.read(buf.slice_mut(len..cap)).await;
    (r.unwrap_or(0), b.into_inner())
}

async fn conn(mut s: TcpStream) {
    let mut buf = Vec::with_capacity(4096);
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let (n, b) = read_more(&mut s, buf).await;
        buf = b;
        if n == 0 {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    buf.drain(..end);
    let key = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        ringgate::ws::handshake::accept_key(key.as_bytes())
    );
    if s.write_all(resp.into_bytes()).await.0.is_err() {
        return;
    }
    let mut out = Vec::with_capacity(4096);
    loop {
        let mut pos = 0;
        while let Ok(Some(h)) = frame::parse_header(&buf[pos..]) {
            let total = h.header_len + h.len as usize;
            if buf.len() - pos < total {
                break;
            }
            let p = &mut buf[pos + h.header_len..pos + total];
            if let Some(k) = h.mask {
                frame::unmask(p, k);
            }
            let opc = if h.opcode == op::PING {
                op::PONG
            } else {
                h.opcode
            };
            frame::encode(&mut out, opc, h.fin, p);
            pos += total;
            if h.opcode == op::CLOSE {
                let _ = s.write_all(out).await;
                return;
            }
        }
        buf.drain(..pos);
        if !out.is_empty() {
            let (r, o) = s.write_all(out).await;
            if r.is_err() {
                return;
            }
            out = o;
            out.clear();
        }
        let (n, b) = read_more(&mut s, buf).await;
        buf = b;
        if n == 0 {
            return;
        }
    }
}
