//! Response heads and bodies read as hyper's HTTP/1 client reads them, but for the differences
//! listed at [`Difference`].

use super::*;

/// How a response was read: its status and whole body, or why not.
pub(super) type Read = Result<(u16, Shown), String>;

/// What the data plane makes of `wire` followed by the close, as [`super::conn::poll_head`] and
/// [`super::body::Body`] do, for a GET.
pub(super) fn ours(wire: &[u8]) -> Read {
    let mut buf = BytesMut::from(wire);
    let head = parse_head(&mut buf, false, false)
        .map_err(|e| e.to_string())?
        .ok_or("the connection closed in the head")?;
    let status = head.response.status().as_u16();
    let mut decoder = Decoder::new(head.framing);
    let mut body = Vec::new();
    loop {
        match decoder.decode(&mut buf).map_err(|e| e.to_string())? {
            Decoded::Data(d) => body.extend_from_slice(&d),
            Decoded::End => return Ok((status, Shown(body))),
            Decoded::NeedMore => {
                decoder.at_close().map_err(|e| e.to_string())?;
                return Ok((status, Shown(body)));
            }
        }
    }
}

/// What hyper's HTTP/1 client makes of `wire` followed by the close, as the answer to a GET,
/// with our field limit.
pub(super) fn hyper_reads(wire: &[u8]) -> Read {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let exchange = async {
            let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
                .max_headers(MAX_HEADERS)
                .handshake::<_, Empty<Bytes>>(TokioIo::new(client))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = http::Request::get("/")
                .header("host", "backend")
                .body(Empty::new())
                .unwrap();
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((status, Shown(body.to_bytes().to_vec())))
        };
        let backend = async {
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match server.read(&mut chunk).await {
                    Ok(0) | Err(_) => return server,
                    Ok(n) => request.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = server.write_all(wire).await;
            let _ = server.shutdown().await;
            // Kept open for reading until hyper is done.
            server
        };
        let both = async { tokio::join!(exchange, backend).0 };
        tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .unwrap_or_else(|_| Err("hyper was still reading after 10 s".into()))
    })
}

/// Where our reading differs from hyper's on purpose, or as a known bug: such cases are left
/// out of the comparison (wholly, or in the direction that differs).
#[derive(Debug, PartialEq)]
enum Difference {
    /// `101 Switching Protocols`: hyper hands the connection over to the caller (an upgrade);
    /// the data plane cannot pass the connection on and refuses it. Left out wholly.
    SwitchingProtocols,
    /// The last `Transfer-Encoding` field holds bytes that are not visible ASCII (obs-text):
    /// hyper cannot read it as text, so it never finds `chunked` in it and reads the body until
    /// the close; we read the codings as bytes and decode a final `chunked`, as RFC 9112
    /// section 6.3 reads them. Different bodies: left out wholly.
    TransferEncodingObsText,
}

impl Case {
    fn difference(&self) -> Option<Difference> {
        let heads = || self.interim.iter().chain([&self.last]);
        if heads().any(|h| h.status == "101") {
            return Some(Difference::SwitchingProtocols);
        }
        let visible = |v: &[u8]| v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
        if self
            .last
            .values("transfer-encoding")
            .last()
            .is_some_and(|v| !visible(v))
        {
            return Some(Difference::TransferEncodingObsText);
        }
        None
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// Where hyper reads a response (within our limits: the field limit is given to hyper, the
    /// heads are far below 64 KiB), we read the same status and body; where we read one, so
    /// does hyper. Interim 1xx heads are skipped by both.
    #[test]
    fn response_heads_are_read_as_hyper_reads_them(case in case()) {
        let wire = case.wire();
        let (ours, theirs) = (ours(&wire), hyper_reads(&wire));
        match case.difference() {
            Some(Difference::SwitchingProtocols | Difference::TransferEncodingObsText) => {}
            None => prop_assert_eq!(
                ours.as_ref().ok(),
                theirs.as_ref().ok(),
                "ours: {:?}, hyper: {:?}",
                ours,
                theirs
            ),
        }
    }

    /// Chunked bodies, valid or damaged: whatever hyper reads, we read the same. The other way
    /// does not hold, on purpose: we read trailers only for their size (they are dropped, not
    /// forwarded) where hyper parses them as header fields, and we take a bare LF as the end of
    /// a chunk-size or trailer line and anything after whitespace following the size as an
    /// extension, where hyper refuses both. The body is framed again for the client and its
    /// trailers dropped, so what is read leniently reaches no other parser.
    #[test]
    fn chunked_bodies_hyper_reads_are_read_the_same(
        bytes in prop_oneof![
            chunked(200).prop_map(|c| c.wire.0),
            (chunked(200), edits()).prop_map(|(c, e)| mutate(c.wire.0, &e)),
        ],
    ) {
        let mut wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        wire.extend_from_slice(&bytes);
        let theirs = hyper_reads(&wire);
        if theirs.is_ok() {
            prop_assert_eq!(ours(&wire), theirs);
        }
    }
}
