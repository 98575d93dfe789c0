//! The client protocol on the wire, and the libp2p transport both ends use.
//!
//! One implementation, shared by the SDK's [`Client`](crate::Client) and the
//! peer's server (`impetus_node::net`):
//!
//! - the frames: each message `[u32 big-endian length][CLIENT_API_VERSION]
//!   [postcard...]`, bounded by [`limits::MAX_MESSAGE_BYTES`], decoded and
//!   validated by [`impetus_proto::api`] ([`read_frame`], [`write_frame`],
//!   [`encode_response_bounded`]). [`crate::stream`] carries them on
//!   long-lived substreams (what clients use); [`ClientCodec`] as
//!   request-response, one substream per request (the peers' fallback).
//! - [`build_swarm`]: TCP → optional pnet (pre-shared key from `--authkey`) →
//!   multistream-select → noise → yamux, all under one handshake timeout.
//!   It is built with `with_other_transport` because `with_tcp()` has no hook
//!   for pnet.
//! - [`resolve_addr`]: `host:port`, `ip:port` or a multiaddr to a dialable
//!   `/ip4|ip6/../tcp/..` address.

use std::io;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use impetus_proto::api::{self, ClientRequest, ClientResponse, ServiceError};
use impetus_proto::limits;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport as _};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder};

/// The protocol name of client requests.
pub const CLIENT_PROTOCOL: StreamProtocol = StreamProtocol::new("/impetus/client/1");

/// The port a peer listens on by default; client commands find a local peer
/// at `127.0.0.1:DEFAULT_PORT` with no flags.
pub const DEFAULT_PORT: u16 = 7420;

/// How long one request may take, from sending it to reading the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Most request substreams one connection handles at once. Beyond it libp2p
/// drops inbound streams, so clients keep fewer than this in flight.
pub const MAX_CONCURRENT_STREAMS: usize = 1024;

/// Connections without traffic stay open this long.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// A request as [`ClientCodec`] carries it. Outbound it is always `Ok`.
/// Inbound it is `Err(reason)` when a well-formed frame holds bytes that are
/// not a valid request of this version: the server answers that with
/// [`ServiceError::InvalidRequest`] instead of dropping the stream, so the
/// client learns why (a version skew, a limit).
pub type RequestFrame = Result<ClientRequest, String>;

/// The request-response codec of `/impetus/client/1`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientCodec;

/// Read one length-prefixed frame of at most `max` bytes. The buffer grows
/// with the bytes that actually arrive, so a lying length prefix cannot make
/// us allocate `max` up front.
pub async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {max} bytes"),
        ));
    }
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    AsyncReadExt::take(&mut *io, len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame cut short: {} of {len} bytes", buf.len()),
        ));
    }
    Ok(buf)
}

/// `body` as one length-prefixed frame; refuses bodies over `max` bytes.
pub fn frame(body: &[u8], max: usize) -> io::Result<Vec<u8>> {
    if body.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("message of {} bytes exceeds the limit of {max} bytes", body.len()),
        ));
    }
    let len = u32::try_from(body.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too long"))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(body);
    Ok(frame)
}

/// `io` within `limit`, or a `TimedOut` error: "{what} within {limit}".
pub async fn within<T>(
    limit: Duration,
    what: &str,
    io: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match tokio::time::timeout(limit, io).await {
        Ok(done) => done,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("{what} within {limit:?}"))),
    }
}

/// Write one length-prefixed frame; refuses bodies over `max` bytes.
pub async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, body: &[u8], max: usize) -> io::Result<()> {
    io.write_all(&frame(body, max)?).await?;
    io.flush().await
}

impl request_response::Codec for ClientCodec {
    type Protocol = StreamProtocol;
    type Request = RequestFrame;
    type Response = ClientResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<RequestFrame>
    where
        T: AsyncRead + Unpin + Send,
    {
        let frame = read_frame(io, limits::MAX_MESSAGE_BYTES).await?;
        Ok(api::decode_request(&frame).map_err(|e| e.to_string()))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<ClientResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let frame = read_frame(io, limits::MAX_MESSAGE_BYTES).await?;
        api::decode_response(&frame).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: RequestFrame) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let req = req.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        write_frame(io, &api::encode_request(&req), limits::MAX_MESSAGE_BYTES).await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, resp: ClientResponse) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &encode_response_bounded(&resp), limits::MAX_MESSAGE_BYTES).await
    }
}

/// The frame body of `resp`; a response over [`limits::MAX_MESSAGE_BYTES`]
/// becomes an [`ServiceError::Internal`] that says so, rather than a cut
/// stream the client could not explain.
pub fn encode_response_bounded(resp: &ClientResponse) -> Vec<u8> {
    let bytes = api::encode_response(resp);
    if bytes.len() <= limits::MAX_MESSAGE_BYTES {
        return bytes;
    }
    tracing::warn!(kind = resp.kind(), len = bytes.len(), "response exceeds the message limit");
    api::encode_response(&ClientResponse::Error(ServiceError::Internal(format!(
        "the {} response is {} bytes, over the limit of {} bytes; ask for less",
        resp.kind(),
        bytes.len(),
        limits::MAX_MESSAGE_BYTES
    ))))
}

/// The request-response behaviour of the client protocol. `support` is
/// [`ProtocolSupport::Outbound`] for a client, `Full` or `Inbound` for a peer.
pub fn client_protocol_behaviour(support: ProtocolSupport) -> request_response::Behaviour<ClientCodec> {
    request_response::Behaviour::with_codec(
        ClientCodec,
        [(CLIENT_PROTOCOL, support)],
        request_response::Config::default()
            .with_request_timeout(REQUEST_TIMEOUT)
            .with_max_concurrent_streams(MAX_CONCURRENT_STREAMS),
    )
}

/// The 32-byte pnet pre-shared key of an `--authkey`: BLAKE3 in key
/// derivation mode, so any string works and equal strings give equal keys.
pub fn psk_from_authkey(authkey: &str) -> PreSharedKey {
    PreSharedKey::new(blake3::derive_key("impetus 2025 pnet pre-shared key v1", authkey.as_bytes()))
}

/// How to build the transport.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Pre-shared key: peers and clients without the same key cannot connect.
    pub authkey: Option<String>,
    /// Bound on TCP connect + pnet + noise + yamux. With a wrong authkey some
    /// handshakes stall instead of failing, so keep it short.
    pub handshake_timeout: Duration,
    /// Close connections idle for this long.
    pub idle_timeout: Duration,
}

impl Default for TransportConfig {
    fn default() -> TransportConfig {
        TransportConfig {
            authkey: None,
            handshake_timeout: Duration::from_secs(2),
            idle_timeout: IDLE_CONNECTION_TIMEOUT,
        }
    }
}

/// Building the swarm failed (noise could not take the identity key).
#[derive(Debug, thiserror::Error)]
#[error("could not build the libp2p transport: {0}")]
pub struct BuildError(String);

/// The authenticated, multiplexed TCP transport: tcp → pnet (if an authkey
/// is set) → noise → yamux, bounded by `cfg.handshake_timeout`.
pub fn build_transport(
    keypair: &Keypair,
    cfg: &TransportConfig,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, BuildError> {
    let noise = noise::Config::new(keypair).map_err(|e| BuildError(e.to_string()))?;
    let mut yamux = yamux::Config::default();
    yamux.set_max_num_streams(MAX_CONCURRENT_STREAMS);
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let timeout = cfg.handshake_timeout;
    let psk = cfg.authkey.as_deref().map(psk_from_authkey);
    let transport = tcp
        .and_then(move |socket, _| async move {
            match psk {
                Some(psk) => PnetConfig::new(psk).handshake(socket).await.map(futures::future::Either::Left),
                None => Ok(futures::future::Either::Right(socket)),
            }
        })
        .upgrade(Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux)
        .timeout(timeout)
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed();
    Ok(transport)
}

/// A tokio swarm over [`build_transport`] with `behaviour`.
pub fn build_swarm<B>(keypair: Keypair, cfg: &TransportConfig, behaviour: B) -> Result<Swarm<B>, BuildError>
where
    B: NetworkBehaviour,
{
    let transport = build_transport(&keypair, cfg)?;
    let idle = cfg.idle_timeout;
    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|_| transport)
        .map_err(|e| BuildError(e.to_string()))?
        .with_behaviour(|_| behaviour)
        .map_err(|e| BuildError(e.to_string()))?
        // Every protocol we open a substream for is known to the other side
        // (both run this code): send the request with the protocol proposal
        // instead of waiting a round trip for its confirmation (V1Lazy).
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(idle)
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    Ok(swarm)
}

/// Turn what a user typed into a dialable multiaddr: `ip:port`,
/// `host:port` (resolved), `[v6]:port`, or a multiaddr (`/ip4/../tcp/..`,
/// `/dns/host/tcp/..`, resolved). A bare host or IP gets [`DEFAULT_PORT`].
pub async fn resolve_addr(addr: &str) -> Result<Multiaddr, String> {
    let addr = addr.trim();
    if addr.is_empty() {
        return Err("the address is empty".into());
    }
    if addr.starts_with('/') {
        let ma: Multiaddr = addr.parse().map_err(|e| format!("not a valid multiaddr: {e}"))?;
        return resolve_multiaddr(ma).await;
    }
    let with_port = if addr.parse::<std::net::IpAddr>().is_ok() && addr.contains(':') {
        // A bare IPv6 address.
        format!("[{addr}]:{DEFAULT_PORT}")
    } else if addr.rsplit_once(':').is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
        addr.to_owned()
    } else {
        format!("{addr}:{DEFAULT_PORT}")
    };
    let sock = match with_port.parse::<std::net::SocketAddr>() {
        Ok(s) => s,
        Err(_) => tokio::net::lookup_host(with_port.as_str())
            .await
            .map_err(|e| format!("cannot resolve {with_port}: {e}"))?
            .next()
            .ok_or_else(|| format!("{with_port} resolves to no address"))?,
    };
    Ok(socket_multiaddr(sock))
}

fn socket_multiaddr(sock: std::net::SocketAddr) -> Multiaddr {
    let ip = match sock.ip() {
        std::net::IpAddr::V4(v4) => Protocol::Ip4(v4),
        std::net::IpAddr::V6(v6) => Protocol::Ip6(v6),
    };
    Multiaddr::empty().with(ip).with(Protocol::Tcp(sock.port()))
}

async fn resolve_multiaddr(ma: Multiaddr) -> Result<Multiaddr, String> {
    let mut it = ma.iter();
    let host = it.next();
    let port = match it.next() {
        Some(Protocol::Tcp(p)) => p,
        _ => return Err(format!("{ma} is not a TCP address (expected /ip4/HOST/tcp/PORT)")),
    };
    let rest: Vec<Protocol<'_>> = it.collect();
    let want_v4 = matches!(host, Some(Protocol::Dns4(_)));
    let want_v6 = matches!(host, Some(Protocol::Dns6(_)));
    let base = match host {
        Some(Protocol::Ip4(_)) | Some(Protocol::Ip6(_)) => return Ok(ma.clone()),
        Some(Protocol::Dns(h)) | Some(Protocol::Dns4(h)) | Some(Protocol::Dns6(h)) => {
            let target = format!("{h}:{port}");
            let sock = tokio::net::lookup_host(target.as_str())
                .await
                .map_err(|e| format!("cannot resolve {h}: {e}"))?
                .find(|s| (!want_v4 || s.is_ipv4()) && (!want_v6 || s.is_ipv6()))
                .ok_or_else(|| format!("{h} resolves to no usable address"))?;
            socket_multiaddr(sock)
        }
        _ => return Err(format!("{ma} is not a TCP address (expected /ip4/HOST/tcp/PORT)")),
    };
    Ok(rest.into_iter().fold(base, |m, p| m.with(p)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use impetus_proto::ids::JobId;
    use libp2p::request_response::Codec as _;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    #[test]
    fn codec_round_trips_requests_and_responses() {
        block_on(async {
            let mut c = ClientCodec;
            let mut buf = Cursor::new(Vec::new());
            c.write_request(&CLIENT_PROTOCOL, &mut buf, Ok(ClientRequest::GetJob(JobId(4)))).await.unwrap();
            buf.set_position(0);
            let req = c.read_request(&CLIENT_PROTOCOL, &mut buf).await.unwrap();
            assert_eq!(req, Ok(ClientRequest::GetJob(JobId(4))));

            let mut buf = Cursor::new(Vec::new());
            c.write_response(&CLIENT_PROTOCOL, &mut buf, ClientResponse::HasModule(true)).await.unwrap();
            buf.set_position(0);
            assert_eq!(c.read_response(&CLIENT_PROTOCOL, &mut buf).await.unwrap(), ClientResponse::HasModule(true));
        });
    }

    #[test]
    fn codec_refuses_bad_frames() {
        block_on(async {
            let mut c = ClientCodec;
            // A length prefix over the limit is refused before any allocation.
            let mut huge = Cursor::new(u32::MAX.to_be_bytes().to_vec());
            let err = c.read_request(&CLIENT_PROTOCOL, &mut huge).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains("exceeds the limit"), "{err}");
            // A frame cut short.
            let mut short = Cursor::new([0, 0, 0, 10, 1, 2].to_vec());
            let err = c.read_request(&CLIENT_PROTOCOL, &mut short).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
            // A well-formed frame with a wrong version becomes an answerable error.
            let mut wrong = Cursor::new([0, 0, 0, 2, 9, 0].to_vec());
            let req = c.read_request(&CLIENT_PROTOCOL, &mut wrong).await.unwrap();
            let speaks = impetus_proto::api::CLIENT_API_VERSION;
            assert_eq!(req, Err(format!("unsupported client request version 9 (this build speaks version {speaks})")));
            // A garbage response is an InvalidData error naming the problem.
            let version = impetus_proto::api::CLIENT_API_VERSION;
            let mut garbage = Cursor::new([0, 0, 0, 3, version, 200, 200].to_vec());
            let err = c.read_response(&CLIENT_PROTOCOL, &mut garbage).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains("malformed client response"), "{err}");
        });
    }

    #[test]
    fn authkeys_derive_stable_distinct_keys() {
        let a = psk_from_authkey("secret");
        assert_eq!(a.fingerprint().to_string(), psk_from_authkey("secret").fingerprint().to_string());
        assert_ne!(a.fingerprint().to_string(), psk_from_authkey("secret2").fingerprint().to_string());
    }

    #[test]
    fn addresses_resolve() {
        block_on(async {
            let cases = [
                ("127.0.0.1:7420", "/ip4/127.0.0.1/tcp/7420"),
                ("127.0.0.1", "/ip4/127.0.0.1/tcp/7420"),
                ("[::1]:9", "/ip6/::1/tcp/9"),
                ("::1", "/ip6/::1/tcp/7420"),
                ("/ip4/10.1.2.3/tcp/80", "/ip4/10.1.2.3/tcp/80"),
                ("localhost:5", "/ip"),
                ("/dns4/localhost/tcp/6", "/ip4/127.0.0.1/tcp/6"),
            ];
            for (input, want) in cases {
                let got = resolve_addr(input).await.unwrap().to_string();
                assert!(got.starts_with(want), "{input} -> {got}, wanted {want}");
            }
            for bad in ["", "/ip4/1.2.3.4/udp/5", "/garbage", "no-such-host.invalid:1"] {
                assert!(resolve_addr(bad).await.is_err(), "{bad} should not resolve");
            }
        });
    }
}
