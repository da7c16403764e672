//! Blobs in an S3-compatible object store (`storage_url = "s3://bucket/prefix"`), through the
//! `object_store` crate and configured by the standard `AWS_*` variables (`AWS_ENDPOINT_URL`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ALLOW_HTTP`). A blob is the
//! object `prefix/blobs/sha256/<hex>`: written once its digest is known and checked (multipart
//! upload from the local file), read back hashed and refused when the bytes do not match.

use std::io;
use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, WriteMultipart};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::digest::{Digest, Hasher};

/// Parts of a multipart upload (S3 wants at least 5 MiB but the last).
const PART_BYTES: usize = 16 << 20;
/// Parts in flight at once per upload.
const PARTS_IN_FLIGHT: usize = 4;

#[derive(Debug)]
pub struct RemoteStore {
    objects: Arc<dyn ObjectStore>,
    prefix: String,
    /// The URL, for messages.
    url: String,
}

fn io_error(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, e),
        e => io::Error::other(format!("object store: {e}")),
    }
}

impl RemoteStore {
    /// Connects to `url` (`s3://bucket` or `s3://bucket/prefix`); nothing is sent yet.
    pub fn open(url: &str) -> io::Result<Self> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "storage_url must be s3://bucket[/prefix]",
            )
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "storage_url names no bucket",
            ));
        }
        let objects = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(io_error)?;
        Ok(Self {
            objects: Arc::new(objects),
            prefix: prefix.trim_matches('/').to_string(),
            url: url.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, digest: &Digest) -> ObjectPath {
        let name = format!("blobs/sha256/{}", digest.hex());
        match self.prefix.as_str() {
            "" => ObjectPath::from(name),
            p => ObjectPath::from(format!("{p}/{name}")),
        }
    }

    /// Whether the bucket answers: one listing under the prefix (a missing bucket or bad
    /// credentials fail it, where a lookup of one object would only say "not found").
    pub async fn ping(&self) -> io::Result<()> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        self.objects
            .list_with_delimiter(prefix.as_ref())
            .await
            .map(|_| ())
            .map_err(io_error)
    }

    /// Whether the blob is in the store.
    pub async fn contains(&self, digest: &Digest) -> io::Result<bool> {
        match self.objects.head(&self.key(digest)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(io_error(e)),
        }
    }

    /// Uploads the local file `path`, whose bytes hash to `digest` (checked by the caller), as
    /// the blob's object, in parts.
    pub async fn upload(&self, path: &Path, digest: &Digest) -> io::Result<()> {
        let upload = self
            .objects
            .put_multipart(&self.key(digest))
            .await
            .map_err(io_error)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut file = tokio::fs::File::open(path).await?;
        let mut buf = vec![0u8; 4 << 20];
        let sent = async {
            loop {
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, io::Error>(());
                }
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(io_error)?;
                writer.write(&buf[..n]);
            }
        }
        .await;
        match sent {
            Ok(()) => writer.finish().await.map(|_| ()).map_err(io_error),
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Downloads the blob into `dest`, hashing on the way; an object whose bytes do not hash
    /// to `digest` is an error (and `dest` is left for the caller's temp file to remove).
    /// Returns the size.
    pub async fn download(&self, digest: &Digest, dest: &Path) -> io::Result<u64> {
        let got = self
            .objects
            .get(&self.key(digest))
            .await
            .map_err(io_error)?;
        let mut stream = got.into_stream();
        let mut file = tokio::fs::File::create(dest).await?;
        let mut hasher = Hasher::default();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(io_error)?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        let actual = hasher.finish();
        if actual != *digest {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "object store {}: the object for {digest} holds bytes that hash to {actual}",
                    self.url
                ),
            ));
        }
        Ok(size)
    }

    /// Deletes the blob's object (a missing one is fine).
    pub async fn delete(&self, digest: &Digest) -> io::Result<()> {
        match self.objects.delete(&self.key(digest)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(io_error(e)),
        }
    }
}
