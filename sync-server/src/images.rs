//! Image thumbnails on their own small pool: a few threads and a short queue, so decoding uploads
//! never takes the blocking threads that database work and commits run on, and a pixel cap read
//! from the image's header refuses decompression bombs before a single pixel is decoded.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// Thumbnails are at most this many pixels wide and high.
const THUMBNAIL_SIDE: u32 = 320;

type Job = Box<dyn FnOnce() + Send>;

/// The decoding threads; they end when the pool is dropped.
pub(crate) struct ImagePool {
    jobs: SyncSender<Job>,
}

/// Why an image got no thumbnail.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ImageError {
    #[error(
        "the image is {width}×{height} pixels ({} megapixels); this relay accepts images up to {} megapixels",
        megapixels(u64::from(*width) * u64::from(*height)),
        megapixels(*max_pixels)
    )]
    TooManyPixels { width: u32, height: u32, max_pixels: u64 },
    #[error("the image cannot be read: {0}")]
    Unreadable(String),
    #[error("the relay is busy with other images; try again in a moment")]
    Busy,
}

fn megapixels(pixels: u64) -> String {
    format!("{:.1}", pixels as f64 / 1_000_000.0)
}

impl ImagePool {
    /// `threads` decoding threads and at most `queue` images waiting for one.
    pub(crate) fn new(threads: usize, queue: usize) -> ImagePool {
        let (jobs, receiver) = std::sync::mpsc::sync_channel::<Job>(queue);
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..threads.max(1) {
            let receiver = receiver.clone();
            let spawned =
                std::thread::Builder::new().name(format!("crewdesk-images-{i}")).spawn(move || work(&receiver));
            if let Err(e) = spawned {
                tracing::warn!(%e, "an image thread could not be started");
            }
        }
        ImagePool { jobs }
    }

    /// A PNG thumbnail of `bytes`, decoded on the pool; `Busy` at once when its queue is full.
    pub(crate) async fn thumbnail(&self, bytes: axum::body::Bytes, max_pixels: u64) -> Result<Vec<u8>, ImageError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(thumbnail(&bytes, max_pixels));
        });
        match self.jobs.try_send(job) {
            Ok(()) => rx.await.unwrap_or(Err(ImageError::Busy)),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(ImageError::Busy),
        }
    }
}

fn work(receiver: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job, not while decoding it.
        let job = match receiver.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        job();
    }
}

/// A PNG thumbnail (at most 320×320) of an image whose header says it has at most `max_pixels`.
pub(crate) fn thumbnail(bytes: &[u8], max_pixels: u64) -> Result<Vec<u8>, ImageError> {
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::Unreadable(e.to_string()))
    };
    let (width, height) = reader()?.into_dimensions().map_err(|e| ImageError::Unreadable(e.to_string()))?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ImageError::TooManyPixels { width, height, max_pixels });
    }
    let mut reader = reader()?;
    // The header could lie about what the decoder will allocate: bound that too (16-bit RGBA is
    // 8 bytes a pixel, plus room for the decoder's own buffers).
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(16 * 1024 * 1024));
    reader.limits(limits);
    let image = reader.decode().map_err(|e| ImageError::Unreadable(e.to_string()))?;
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .thumbnail(THUMBNAIL_SIDE, THUMBNAIL_SIDE)
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| ImageError::Unreadable(e.to_string()))?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        image::RgbImage::new(width, height).write_to(&mut out, image::ImageFormat::Png).expect("encode");
        out.into_inner()
    }

    #[test]
    fn the_pixel_cap_is_read_from_the_header_and_names_both_sizes() {
        let image = png(2000, 1500);
        let e = thumbnail(&image, 2_000_000).unwrap_err();
        assert_eq!(e, ImageError::TooManyPixels { width: 2000, height: 1500, max_pixels: 2_000_000 });
        assert_eq!(
            e.to_string(),
            "the image is 2000×1500 pixels (3.0 megapixels); this relay accepts images up to 2.0 megapixels"
        );
        let thumb = thumbnail(&image, 3_000_000).expect("exactly at the cap");
        let decoded = image::load_from_memory(&thumb).expect("a png");
        assert_eq!((decoded.width(), decoded.height()), (320, 240));
        assert!(matches!(thumbnail(b"\x89PNG\r\n\x1a\nnot really", 1_000_000), Err(ImageError::Unreadable(_))));
    }

    #[tokio::test]
    async fn a_full_queue_answers_busy_at_once_and_the_pool_keeps_working() {
        let pool = ImagePool::new(1, 1);
        // Occupy the only thread, then fill the only queue slot.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        pool.jobs
            .try_send(Box::new(move || {
                let _ = wait.recv();
            }))
            .expect("to the thread");
        let mut queued = None;
        for _ in 0..100 {
            match pool.jobs.try_send(Box::new(|| {})) {
                Ok(()) => {
                    queued = Some(());
                    break;
                }
                // The thread has not taken the first job yet.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        assert!(queued.is_some(), "the queue took one job");
        let started = std::time::Instant::now();
        assert_eq!(pool.thumbnail(png(10, 10).into(), 1_000_000).await, Err(ImageError::Busy));
        assert!(started.elapsed() < std::time::Duration::from_millis(500), "not waiting for a slot");
        release.send(()).expect("release");
        // Once the thread has taken the queued job, there is room again.
        let mut answer = Err(ImageError::Busy);
        for _ in 0..200 {
            answer = pool.thumbnail(png(10, 10).into(), 1_000_000).await;
            if answer != Err(ImageError::Busy) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!answer.expect("the pool works again").is_empty());
    }
}
