//! The batched sender against real sockets on loopback: every datagram of a
//! mixed batch (GSO-eligible runs, odd sizes, several destinations) arrives
//! intact and in order per destination, and one bad destination fails alone.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use media_node::udp::{MediaSocket, Outgoing};

fn sink() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn drain(s: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
    let mut buf = [0u8; 2048];
    (0..n)
        .map(|_| {
            let k = s.recv(&mut buf).expect("datagram did not arrive");
            buf[..k].to_vec()
        })
        .collect()
}

fn datagram(dest: u8, i: usize, len: usize) -> Vec<u8> {
    let mut d = vec![dest; len];
    d[..2].copy_from_slice(&(i as u16).to_be_bytes());
    d
}

#[tokio::test]
async fn every_datagram_arrives_in_order_per_destination() {
    let sock = MediaSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let (a, b) = (sink(), sink());
    let (aa, ba) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    // To a: a run of 1200-byte datagrams ending in a short one (one GSO send
    // where supported), then odd sizes. To b: interleaved with a's, varied.
    let mut planned: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    for i in 0..40 {
        planned.push((aa, datagram(1, i, if i == 30 { 300 } else { 1200 })));
        planned.push((ba, datagram(2, i, 100 + i * 7)));
    }
    let out: Vec<Outgoing<'_>> = planned
        .iter()
        .map(|(to, data)| Outgoing { to: *to, data })
        .collect();
    let mut ok = vec![false; out.len()];
    sock.send_batch(&out, |k, r| ok[k] = r.is_ok()).await;
    assert!(ok.iter().all(|&o| o), "every send reported success");
    let want = |dest: SocketAddr| -> Vec<Vec<u8>> {
        planned
            .iter()
            .filter(|(to, _)| *to == dest)
            .map(|(_, d)| d.clone())
            .collect()
    };
    assert_eq!(drain(&a, 40), want(aa));
    assert_eq!(drain(&b, 40), want(ba));
}

#[tokio::test]
async fn a_refused_destination_fails_alone() {
    let sock = MediaSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let a = sink();
    let aa = a.local_addr().unwrap();
    // Port 0 is not a valid destination: the kernel refuses that datagram.
    let bad: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let planned = [
        (aa, datagram(1, 0, 50)),
        (bad, datagram(9, 1, 77)),
        (aa, datagram(1, 2, 60)),
    ];
    let out: Vec<Outgoing<'_>> = planned
        .iter()
        .map(|(to, data)| Outgoing { to: *to, data })
        .collect();
    let mut results = vec![None; out.len()];
    sock.send_batch(&out, |k, r| results[k] = Some(r.is_ok()))
        .await;
    assert_eq!(results, vec![Some(true), Some(false), Some(true)]);
    assert_eq!(
        drain(&a, 2),
        vec![planned[0].1.clone(), planned[2].1.clone()]
    );
}
