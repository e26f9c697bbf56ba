//! The stream multiplexer: yamux, as libp2p's own adapter runs it, with one
//! setting that adapter does not expose: how much of a write goes into one
//! yamux frame.
//!
//! yamux cuts every write into frames of at most 16 KiB by default, and
//! each frame leaves the connection as its own noise frame and `sendto`. A
//! delivery batch is hundreds of KiB, so that was about 25 frames,
//! encryptions and syscalls per batch on each side. At [`SPLIT_SEND_SIZE`]
//! a frame fills one noise frame (at most 65,535 bytes): in alternating
//! runs of `bench delivery` it took about 6% less CPU per message end to
//! end (BENCHMARKS.md, stop 21). The price is head-of-line blocking: a
//! small frame of another stream (a ping, a gossip message) waits behind up
//! to one bigger frame, about 5 ms on a 100 Mbit/s link instead of 1.3 ms.
//!
//! On the wire this is plain `/yamux/1.0.0`: a receiver takes frames of up
//! to 1 MiB whatever its own send size, so nodes with the default mix
//! freely with these.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::{io, iter};

use futures::{AsyncRead, AsyncWrite, future};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};

/// Bytes of a write that go into one yamux frame: with the 12-byte yamux
/// header, the frame still fits one noise frame.
pub const SPLIT_SEND_SIZE: usize = 60 * 1024;

/// Inbound streams held for `poll_inbound` while the swarm drives the
/// connection through `poll`; beyond these, new ones are refused (dropped,
/// which resets them) rather than buffered without bound.
const MAX_WAITING_INBOUND: usize = 256;

/// The multiplexer upgrade (`/yamux/1.0.0`).
#[derive(Debug, Clone)]
pub struct Yamux(yamux::Config);

impl Yamux {
    /// yamux's defaults, with writes cut at [`SPLIT_SEND_SIZE`].
    pub fn new() -> Self {
        let mut c = yamux::Config::default();
        c.set_split_send_size(SPLIT_SEND_SIZE);
        Yamux(c)
    }

    fn muxer<C>(self, io: C, mode: yamux::Mode) -> future::Ready<Result<Muxer<C>, io::Error>>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        future::ready(Ok(Muxer {
            conn: yamux::Connection::new(io, self.0, mode),
            inbound: VecDeque::new(),
            inbound_waker: None,
        }))
    }
}

impl Default for Yamux {
    fn default() -> Self {
        Yamux::new()
    }
}

impl UpgradeInfo for Yamux {
    type Info = &'static str;
    type InfoIter = iter::Once<&'static str>;

    fn protocol_info(&self) -> Self::InfoIter {
        iter::once("/yamux/1.0.0")
    }
}

impl<C> InboundConnectionUpgrade<C> for Yamux
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<Result<Muxer<C>, io::Error>>;

    fn upgrade_inbound(self, io: C, _: &'static str) -> Self::Future {
        self.muxer(io, yamux::Mode::Server)
    }
}

impl<C> OutboundConnectionUpgrade<C> for Yamux
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<Result<Muxer<C>, io::Error>>;

    fn upgrade_outbound(self, io: C, _: &'static str) -> Self::Future {
        self.muxer(io, yamux::Mode::Client)
    }
}

/// One multiplexed connection.
#[derive(Debug)]
pub struct Muxer<C> {
    conn: yamux::Connection<C>,
    /// Streams the peer opened while the swarm was in `poll`, not
    /// `poll_inbound`: yamux hands them out only from the one call that
    /// also drives the connection.
    inbound: VecDeque<yamux::Stream>,
    /// The task waiting in `poll_inbound`.
    inbound_waker: Option<Waker>,
}

impl<C> StreamMuxer for Muxer<C>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    type Substream = yamux::Stream;
    type Error = yamux::ConnectionError;

    fn poll_inbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<yamux::Stream, Self::Error>> {
        let this = self.get_mut();
        if let Some(s) = this.inbound.pop_front() {
            return Poll::Ready(Ok(s));
        }
        match this.conn.poll_next_inbound(cx) {
            Poll::Ready(next) => Poll::Ready(next.unwrap_or(Err(yamux::ConnectionError::Closed))),
            Poll::Pending => {
                this.inbound_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn poll_outbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<yamux::Stream, Self::Error>> {
        self.get_mut().conn.poll_new_outbound(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().conn.poll_close(cx)
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        let this = self.get_mut();
        let stream = match this.conn.poll_next_inbound(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(Err(yamux::ConnectionError::Closed)),
            Poll::Ready(Some(r)) => r?,
        };
        if this.inbound.len() >= MAX_WAITING_INBOUND {
            tracing::warn!(%stream, "refusing an inbound stream: {MAX_WAITING_INBOUND} wait already");
            drop(stream);
        } else {
            this.inbound.push_back(stream);
            if let Some(w) = this.inbound_waker.take() {
                w.wake();
            }
        }
        // More may be ready: come back rather than loop here, so that one
        // busy connection does not hold the task.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use futures::{AsyncReadExt, AsyncWriteExt};
    use libp2p::core::muxing::StreamMuxerExt;
    use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

    use super::*;

    /// An io that records the size of every write.
    struct Counted {
        io: Compat<tokio::io::DuplexStream>,
        writes: Arc<Mutex<Vec<usize>>>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.io).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = &r {
                self.writes.lock().unwrap().push(*n);
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_close(cx)
        }
    }

    /// Our muxer opens a stream to a peer running stock yamux (16 KiB
    /// frames), sends 200 KiB and reads it echoed back: each side takes the
    /// other's frame size, and ours go out `SPLIT_SEND_SIZE` at a time.
    #[tokio::test]
    async fn big_frames_go_out_and_a_stock_yamux_peer_reads_and_answers_them() {
        let (a, b) = tokio::io::duplex(4 << 20);
        let writes = Arc::new(Mutex::new(Vec::new()));
        let ours = Counted {
            io: a.compat(),
            writes: writes.clone(),
        };
        let mut muxer = Yamux::new()
            .upgrade_outbound(ours, "/yamux/1.0.0")
            .await
            .unwrap();
        let mut stock =
            yamux::Connection::new(b.compat(), yamux::Config::default(), yamux::Mode::Server);

        // The stock peer echoes its one stream.
        let echo = tokio::spawn(async move {
            let mut s = future::poll_fn(|cx| stock.poll_next_inbound(cx))
                .await
                .unwrap()
                .unwrap();
            let drive = tokio::spawn(async move {
                while let Some(Ok(_)) = future::poll_fn(|cx| stock.poll_next_inbound(cx)).await {}
            });
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(&got).await.unwrap();
            s.close().await.unwrap();
            drive.await.unwrap();
        });

        let mut s = future::poll_fn(|cx| muxer.poll_outbound_unpin(cx))
            .await
            .unwrap();
        // Drives our connection until told to close it, then closes it,
        // which ends the stock peer's loop.
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let drive = tokio::spawn(async move {
            tokio::select! {
                _ = future::poll_fn(|cx| muxer.poll_unpin(cx)) => {}
                _ = stopped => {}
            }
            let _ = future::poll_fn(|cx| muxer.poll_close_unpin(cx)).await;
        });
        let sent: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
        let exchange = async {
            s.write_all(&sent).await.unwrap();
            s.close().await.unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            back
        };
        let back = tokio::time::timeout(std::time::Duration::from_secs(30), exchange)
            .await
            .expect("the echo came back within 30 s");
        assert_eq!(back, sent, "the echo differs from what was sent");

        let biggest = writes.lock().unwrap().iter().copied().max().unwrap();
        assert_eq!(
            biggest, SPLIT_SEND_SIZE,
            "frame bodies go out whole, at the split size"
        );
        drop(s);
        stop.send(()).unwrap();
        let ends = async {
            drive.await.unwrap();
            echo.await.unwrap();
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), ends)
            .await
            .expect("both connections closed within 30 s");
    }
}
