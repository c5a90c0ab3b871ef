//! Read coalescing for a busy subscriber (iotp patch, IOTP.md).
//!
//! A broker writes each PUBLISH on its own, so a subscriber that takes thousands a second is
//! woken for each TCP segment and reads one or two packets a time. While reads come that
//! often, [`Coalescing`] raises the socket's low-water mark (`SO_RCVLOWAT`): the kernel wakes
//! the reader only once `bytes` are queued, and after `wait` without that much the reader
//! takes whatever is there. When that late read finds little, traffic is light: the mark
//! goes back to one byte and every segment wakes the reader again, as without this.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::framed::AsyncReadWrite;

/// `tcp`, coalescing its reads when `coalescing` is set and `byte_stream` (plain TCP, or TLS
/// above it, which takes whatever bytes a read brings; not a websocket).
pub(crate) fn boxed(
    tcp: TcpStream,
    byte_stream: bool,
    coalescing: Option<(usize, Duration)>,
) -> Box<dyn AsyncReadWrite> {
    #[cfg(unix)]
    if let (true, Some((bytes, wait))) = (byte_stream, coalescing) {
        return Box::new(unix::Coalescing::new(tcp, bytes, wait));
    }
    let _ = (byte_stream, coalescing);
    Box::new(tcp)
}

#[cfg(unix)]
mod unix {
    use std::future::Future;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::TcpStream;
    use tokio::time::{Instant, Sleep};

    /// Reads within one window that turn coalescing on: at this many, the reader was woken at
    /// least 1,600 times a second.
    const BUSY_READS: u32 = 16;
    const WINDOW: Duration = Duration::from_millis(10);

    /// A TCP stream whose reads are coalesced while it is busy.
    pub(crate) struct Coalescing {
        inner: TcpStream,
        /// The low-water mark while coalescing, bytes.
        bytes: usize,
        /// Longest a read waits for `bytes` before it takes what is there.
        wait: Duration,
        /// Whether the low-water mark is raised.
        on: bool,
        /// Armed while a read waits below the mark.
        timer: Pin<Box<Sleep>>,
        armed: bool,
        window_start: Instant,
        reads: u32,
    }

    impl Coalescing {
        pub(crate) fn new(inner: TcpStream, bytes: usize, wait: Duration) -> Self {
            Self {
                inner,
                bytes,
                wait,
                on: false,
                timer: Box::pin(tokio::time::sleep(wait)),
                armed: false,
                window_start: Instant::now(),
                reads: 0,
            }
        }

        fn set_lowat(&mut self, on: bool) {
            let value: libc::c_int = if on { self.bytes as libc::c_int } else { 1 };
            // SAFETY: a valid socket descriptor and a c_int option value of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    self.inner.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVLOWAT,
                    (&value as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            // Lowering the mark makes the kernel signal data already queued above it, so nothing
            // waits; where the option cannot be set, reads stay as they were.
            if rc == 0 {
                self.on = on;
            }
        }

        /// After a read the readiness of the socket delivered.
        fn counted(&mut self) {
            if self.on {
                return;
            }
            let now = Instant::now();
            if now.duration_since(self.window_start) > WINDOW {
                self.window_start = now;
                self.reads = 0;
            }
            self.reads += 1;
            if self.reads >= BUSY_READS {
                self.set_lowat(true);
            }
        }

        /// Read what the socket holds without waiting: the reactor is not told of data below the
        /// mark, so this goes to the socket itself.
        fn read_now(&mut self, buf: &mut ReadBuf<'_>) -> io::Result<Option<usize>> {
            let unfilled = buf.initialize_unfilled();
            // SAFETY: `unfilled` is initialised memory of the length given.
            let n = unsafe {
                libc::recv(
                    self.inner.as_raw_fd(),
                    unfilled.as_mut_ptr().cast(),
                    unfilled.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(None),
                    io::ErrorKind::Interrupted => Ok(None),
                    _ => Err(e),
                };
            }
            let n = n as usize;
            buf.advance(n);
            Ok(Some(n))
        }
    }

    impl AsyncRead for Coalescing {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.bytes <= 1 {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            loop {
                match Pin::new(&mut this.inner).poll_read(cx, buf) {
                    Poll::Ready(Ok(())) => {
                        this.armed = false;
                        this.counted();
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending if !this.on => return Poll::Pending,
                    Poll::Pending => {}
                }
                if !this.armed {
                    this.timer.as_mut().reset(Instant::now() + this.wait);
                    this.armed = true;
                }
                if this.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.armed = false;
                match this.read_now(buf) {
                    Err(e) => return Poll::Ready(Err(e)),
                    Ok(Some(n)) => {
                        if n < this.bytes / 8 {
                            this.set_lowat(false);
                        }
                        // 0 is the end of the stream.
                        return Poll::Ready(Ok(()));
                    }
                    // Nothing there at all: light traffic. Back to a wake-up per segment.
                    Ok(None) => this.set_lowat(false),
                }
            }
        }
    }

    impl AsyncWrite for Coalescing {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    #[cfg(test)]
    mod tests {
        use std::io::Write;
        use std::time::Duration;

        use tokio::io::AsyncReadExt;
        use tokio::net::TcpListener;

        use super::Coalescing;

        const MARK: usize = 8 * 1024;
        const WAIT: Duration = Duration::from_millis(2);

        /// A reader over loopback, and the writing end as a blocking std stream.
        async fn pair() -> (Coalescing, std::net::TcpStream) {
            pair_waiting(WAIT).await
        }

        async fn pair_waiting(wait: Duration) -> (Coalescing, std::net::TcpStream) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let writer = std::thread::spawn(move || std::net::TcpStream::connect(addr).unwrap());
            let (reader, _) = listener.accept().await.unwrap();
            let writer = writer.join().unwrap();
            writer.set_nodelay(true).unwrap();
            (Coalescing::new(reader, MARK, wait), writer)
        }

        /// Read until the end of the stream: the bytes and how many reads returned data.
        async fn read_all(reader: &mut Coalescing) -> (Vec<u8>, usize) {
            let (mut all, mut reads) = (Vec::new(), 0);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = tokio::time::timeout(Duration::from_secs(20), reader.read(&mut buf))
                    .await
                    .expect("a read waited 20 s: data below the mark was never taken")
                    .unwrap();
                if n == 0 {
                    return (all, reads);
                }
                reads += 1;
                all.extend_from_slice(&buf[..n]);
            }
        }

        #[tokio::test]
        async fn a_busy_stream_is_read_in_chunks_and_nothing_is_lost() {
            let (mut reader, mut writer) = pair().await;
            let writes = 3_000;
            let sent: Vec<u8> = (0..writes * 100).map(|i| (i % 251) as u8).collect();
            let expected = sent.clone();
            // A segment every ~50 µs, as a broker writes PUBLISHes one by one.
            let t = std::thread::spawn(move || {
                for chunk in sent.chunks(100) {
                    writer.write_all(chunk).unwrap();
                    std::thread::sleep(Duration::from_micros(50));
                }
            });
            let (got, reads) = read_all(&mut reader).await;
            t.join().unwrap();
            assert_eq!(got, expected, "bytes lost, reordered or duplicated");
            assert!(
                reads * 4 < writes,
                "{reads} reads for {writes} writes: the reads were not coalesced"
            );
        }

        #[tokio::test]
        async fn bytes_below_the_mark_are_read_after_the_wait_and_the_mark_drops() {
            // A long wait, so that the bytes arrive while the reader waits below the mark.
            let (mut reader, mut writer) = pair_waiting(Duration::from_millis(300)).await;
            let mut buf = vec![0u8; 64 * 1024];
            // As after a burst: the mark raised.
            reader.set_lowat(true);
            assert!(reader.on, "SO_RCVLOWAT could not be set");
            let write = async {
                tokio::time::sleep(Duration::from_millis(30)).await;
                writer.write_all(b"ping").unwrap();
            };
            let read = async {
                tokio::time::timeout(Duration::from_secs(20), reader.read(&mut buf))
                    .await
                    .expect("4 bytes below the mark were never read")
                    .unwrap()
            };
            let ((), n) = tokio::join!(write, read);
            assert_eq!(&buf[..n], b"ping");
            assert!(!reader.on, "a late read of 4 bytes left the mark raised");
            // Reads as without coalescing from then on, and the end of the stream arrives.
            writer.write_all(b"pong").unwrap();
            let n = reader.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"pong");
            drop(writer);
            assert_eq!(reader.read(&mut buf).await.unwrap(), 0, "end of stream");
        }

        #[tokio::test]
        async fn the_end_of_the_stream_wakes_a_reader_below_the_mark() {
            let (mut reader, mut writer) = pair().await;
            reader.set_lowat(true);
            writer.write_all(b"last").unwrap();
            drop(writer);
            let (got, _) = read_all(&mut reader).await;
            assert_eq!(got, b"last");
        }
    }
}
