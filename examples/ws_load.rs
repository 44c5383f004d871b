//! WebSocket load client for perf runs (`perf/ws.sh`): one monoio thread.
//!
//! `ws_load bench ADDR PATH CONNS SECONDS SIZE`: CONNS connections each send a SIZE-byte text
//! message and wait for its echo, over and over; prints `msgs mps p50_us p99_us`.
//! `ws_load idle ADDR PATH CONNS READY_FILE`: opens CONNS connections, writes READY_FILE once
//! all are established, then holds them until killed.

use hdrhistogram::Histogram;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use ringgate::ws::frame::{self, op};
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let addr: SocketAddr = a[2].parse().expect("ADDR");
    let path = a[3].clone();
    let conns: usize = a[4].parse().expect("CONNS");
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("runtime");
    match a[1].as_str() {
        "bench" => {
            let secs: u64 = a[5].parse().expect("SECONDS");
            let size: usize = a[6].parse().expect("SIZE");
            rt.block_on(bench(addr, path, conns, secs, size));
        }
        "idle" => rt.block_on(idle(addr, path, conns, a[5].clone())),
        m => panic!("unknown mode {m}"),
    }
}

async fn read_more(s: &mut TcpStream, mut buf: Vec<u8>) -> (usize, Vec<u8>) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(buf.capacity().max(4096));
    }
    let len = buf.len();
    let cap = buf.capacity();
    let (r, b) = s.read(buf.slice_mut(len..cap)).await;
    (r.unwrap_or(0), b.into_inner())
}

async fn connect(addr: SocketAddr, path: &str) -> Option<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect_addr(addr).await.ok()?;
    let _ = s.set_nodelay(true);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.into_bytes()).await.0.ok()?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 101") {
                eprintln!("handshake refused: {}", String::from_utf8_lossy(&buf[..i]));
                return None;
            }
            buf.drain(..i + 4);
            return Some((s, buf));
        }
        let (n, b) = read_more(&mut s, buf).await;
        buf = b;
        if n == 0 {
            return None;
        }
    }
}

async fn bench(addr: SocketAddr, path: String, conns: usize, secs: u64, size: usize) {
    let hist = Rc::new(RefCell::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ));
    let count = Rc::new(Cell::new(0u64));
    let start = Rc::new(Cell::new(None::<Instant>));
    let mut tasks = Vec::new();
    let ready = Rc::new(Cell::new(0usize));
    for _ in 0..conns {
        let (hist, count, start, ready, path) = (
            hist.clone(),
            count.clone(),
            start.clone(),
            ready.clone(),
            path.clone(),
        );
        tasks.push(monoio::spawn(async move {
            let Some((mut s, mut buf)) = connect(addr, &path).await else {
                return;
            };
            ready.set(ready.get() + 1);
            let payload = vec![b'x'; size];
            let mut msg = Vec::new();
            frame::encode(&mut msg, op::TEXT, true, &payload);
            let hl = msg.len() - size;
            msg[1] |= 0x80;
            msg.splice(hl..hl, [1u8, 2, 3, 4]);
            let key = [1u8, 2, 3, 4];
            frame::unmask(&mut msg[hl + 4..], key);
            loop {
                let t = Instant::now();
                let (r, m) = s.write_all(msg).await;
                msg = m;
                if r.is_err() {
                    return;
                }
                loop {
                    if let Ok(Some(h)) = frame::parse_header(&buf) {
                        let total = h.header_len + h.len as usize;
                        if buf.len() >= total {
                            buf.drain(..total);
                            break;
                        }
                    }
                    let (n, b) = read_more(&mut s, buf).await;
                    buf = b;
                    if n == 0 {
                        return;
                    }
                }
                if let Some(st) = start.get() {
                    if st.elapsed() >= Duration::from_secs(secs) {
                        return;
                    }
                    count.set(count.get() + 1);
                    let _ = hist
                        .borrow_mut()
                        .record(t.elapsed().as_micros().max(1) as u64);
                }
            }
        }));
    }
    // Measure once every connection is up.
    let t0 = Instant::now();
    while ready.get() < conns && t0.elapsed() < Duration::from_secs(10) {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    let st = Instant::now();
    start.set(Some(st));
    for t in tasks {
        t.await;
    }
    let el = st.elapsed().as_secs_f64();
    let h = hist.borrow();
    println!(
        "{} {:.0} {} {}",
        count.get(),
        count.get() as f64 / el,
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99)
    );
}

async fn idle(addr: SocketAddr, path: String, conns: usize, ready_file: String) {
    let open = Rc::new(Cell::new(0usize));
    let mut held = Vec::new();
    // Connect in batches so the backlog never overflows.
    for chunk in 0..conns.div_ceil(200) {
        let mut batch = Vec::new();
        for _ in 0..200.min(conns - chunk * 200) {
            let path = path.clone();
            batch.push(monoio::spawn(async move { connect(addr, &path).await }));
        }
        for b in batch {
            if let Some(c) = b.await {
                open.set(open.get() + 1);
                held.push(c);
            }
        }
    }
    std::fs::write(&ready_file, format!("{}\n", open.get())).unwrap();
    loop {
        monoio::time::sleep(Duration::from_secs(3600)).await;
    }
}
