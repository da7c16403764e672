//! The content-addressed blob store: `blobs/sha256/ab/<hex>` for every file quantd keeps,
//! `tmp/` for files being written. Every file is written to `tmp/`, fsynced and only then
//! renamed into place, so a crash never leaves a half-written blob under its digest. A
//! [`TempFile`] deletes itself unless it was committed, which is how failed uploads and
//! cancelled jobs leave nothing behind.
//!
//! The blobs live in the local directory, or in an S3-compatible object store (`storage_url`,
//! see [`remote`]); then the local directory is this replica's cache of the files it must
//! memory-map (weights to serve, a job's checkpoint, a dataset), filled from the store, checked
//! against the digest, and kept under `cache_max_bytes` by evicting the least recently used.

mod digest;
pub mod remote;
mod temp;

pub use digest::{Digest, DigestError};
pub use remote::RemoteStore;
pub use temp::{HashingWriter, TempFile};

use std::sync::Arc;

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

/// How long an upload may go without receiving a byte.
pub const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    /// Where temp files go: `tmp/`, or a job's own `tmp/job-<id>/` (see [`BlobStore::for_job`]).
    tmp: PathBuf,
    /// The object store holding the blobs, when not this directory.
    remote: Option<Arc<RemoteStore>>,
    /// With a remote store: the most the local copies may take (0: no limit).
    cache_max_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{limit_name}: body exceeds the limit of {limit} bytes")]
    TooLarge {
        limit_name: &'static str,
        limit: u64,
    },
    #[error("digest mismatch: the body hashes to {actual}, not {expected}")]
    DigestMismatch { expected: String, actual: String },
    #[error("reading the request body: {0}")]
    Body(String),
    #[error("the client sent nothing for {0} seconds")]
    Stalled(u64),
    #[error("blob store I/O: {0}")]
    Io(#[from] io::Error),
}

impl BlobStore {
    /// Creates the directory layout if it is missing.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let store = Self {
            root: data_dir.to_path_buf(),
            tmp: data_dir.join("tmp"),
            remote: None,
            cache_max_bytes: 0,
        };
        std::fs::create_dir_all(store.blob_root())?;
        std::fs::create_dir_all(store.tmp_dir())?;
        Ok(store)
    }

    fn blob_root(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.tmp.clone()
    }

    fn job_tmp_dir(&self, job_id: &str) -> PathBuf {
        self.root.join("tmp").join(format!("job-{job_id}"))
    }

    /// The store as one job uses it: its temp files go to `tmp/job-<id>/`, so whoever runs the
    /// job next (after a crash, or on another replica once the lease expired) can remove what
    /// an earlier attempt left, which in a store shared by replicas no start-up sweep may do.
    pub fn for_job(&self, job_id: &str) -> io::Result<BlobStore> {
        let tmp = self.job_tmp_dir(job_id);
        std::fs::create_dir_all(&tmp)?;
        Ok(Self {
            tmp,
            ..self.clone()
        })
    }

    /// Removes a job's temp directory with whatever earlier attempts left in it.
    pub fn clear_job_temps(&self, job_id: &str) -> io::Result<()> {
        match std::fs::remove_dir_all(self.job_tmp_dir(job_id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Keeps the blobs in `remote`; this directory becomes a cache of at most
    /// `cache_max_bytes` (0: unbounded).
    pub fn with_remote(self, remote: RemoteStore, cache_max_bytes: u64) -> Self {
        Self {
            remote: Some(Arc::new(remote)),
            cache_max_bytes,
            ..self
        }
    }

    /// The object store's URL, when the blobs live in one.
    pub fn remote_url(&self) -> Option<&str> {
        self.remote.as_deref().map(RemoteStore::url)
    }

    /// Where a blob's local file is (whether or not it exists).
    fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blob_root().join(&hex[..2]).join(hex)
    }

    /// A new temp file that removes itself on drop unless committed.
    pub fn temp_file(&self, purpose: &str) -> io::Result<TempFile> {
        TempFile::create(&self.tmp_dir(), purpose)
    }

    /// Stores a finished temp file (already fsynced) whose bytes hash to `digest`: uploads it
    /// to the object store (unless the object exists), then moves it to its local path. When
    /// the blob already exists the temp file is simply dropped: same digest, same bytes.
    pub async fn commit(&self, temp: TempFile, digest: &Digest) -> io::Result<PathBuf> {
        if let Some(remote) = &self.remote {
            if !remote.contains(digest).await? {
                remote.upload(temp.path(), digest).await?;
            }
        }
        let dest = self.commit_local(temp, digest)?;
        self.evict_to_fit(&dest);
        Ok(dest)
    }

    /// Whether the blob is stored (in the object store, or here).
    pub async fn contains(&self, digest: &Digest) -> io::Result<bool> {
        match &self.remote {
            Some(remote) => remote.contains(digest).await,
            None => Ok(self.path(digest).exists()),
        }
    }

    /// The local file of a stored blob, to read or memory-map: with an object store, fetched
    /// into the cache first (and verified) when it is not there. The file is only as present
    /// as the blob: a local store returns the path of a missing blob as it is.
    pub async fn local_path(&self, digest: &Digest) -> io::Result<PathBuf> {
        let dest = self.path(digest);
        let Some(remote) = &self.remote else {
            return Ok(dest);
        };
        if dest.exists() {
            // Recently used: the last to be evicted.
            if let Ok(f) = std::fs::File::options().write(true).open(&dest) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
            return Ok(dest);
        }
        let temp = self.temp_file("fetch")?;
        remote.download(digest, temp.path()).await?;
        let dest = self.commit_local(temp, digest)?;
        self.evict_to_fit(&dest);
        Ok(dest)
    }

    /// Whether the store answers (readiness): the local directory is there, or the object
    /// store's bucket answers a listing.
    pub async fn ping(&self) -> bool {
        match &self.remote {
            Some(remote) => remote.ping().await.is_ok(),
            None => self.tmp_dir().is_dir(),
        }
    }

    /// With a cache limit: removes the least recently used local copies until the cache fits,
    /// never `keep` (just fetched or stored). A file some model has memory-mapped stays
    /// readable for it after the unlink.
    fn evict_to_fit(&self, keep: &Path) {
        if self.remote.is_none() || self.cache_max_bytes == 0 {
            return;
        }
        let mut entries = Vec::new();
        let mut total = 0u64;
        let shards = std::fs::read_dir(self.blob_root())
            .into_iter()
            .flatten()
            .flatten();
        for shard in shards {
            for entry in std::fs::read_dir(shard.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let Ok(meta) = entry.metadata() else { continue };
                total += meta.len();
                let used = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                entries.push((used, meta.len(), entry.path()));
            }
        }
        entries.sort();
        for (_, size, path) in entries {
            if total <= self.cache_max_bytes {
                break;
            }
            if path != keep && std::fs::remove_file(&path).is_ok() {
                total -= size;
            }
        }
    }

    /// Moves a finished temp file to the blob's local path.
    fn commit_local(&self, temp: TempFile, digest: &Digest) -> io::Result<PathBuf> {
        let dest = self.path(digest);
        if dest.exists() {
            return Ok(dest);
        }
        let dir = dest.parent().expect("blob path has a parent");
        std::fs::create_dir_all(dir)?;
        temp.persist(&dest)?;
        sync_dir(dir)?;
        Ok(dest)
    }

    /// Deletes a blob no row refers to any more: its object and its local file.
    pub async fn remove(&self, digest: &Digest) -> io::Result<()> {
        if let Some(remote) = &self.remote {
            remote.delete(digest).await?;
        }
        match std::fs::remove_file(self.path(digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Streams a request body into a temp file under a size cap, hashing as it goes.
    pub async fn receive<S, E>(
        &self,
        mut body: S,
        limit: u64,
        limit_name: &'static str,
    ) -> Result<(TempFile, Digest, u64), StoreError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let temp = self.temp_file("upload")?;
        let mut file = tokio::fs::File::create(temp.path()).await?;
        let mut hasher = digest::Hasher::default();
        let mut size = 0u64;
        loop {
            // A client that stops sending is cut off instead of holding a temp file forever.
            let next = tokio::time::timeout(UPLOAD_IDLE_TIMEOUT, body.next())
                .await
                .map_err(|_| StoreError::Stalled(UPLOAD_IDLE_TIMEOUT.as_secs()))?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| StoreError::Body(e.to_string()))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(StoreError::TooLarge { limit_name, limit });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        Ok((temp, hasher.finish(), size))
    }

    /// Start-up clean-up: empties `tmp/` and removes blob files that no row refers to (left by
    /// a crash between the rename and the database commit). Only entries last modified at
    /// least `min_age` ago go: zero for a store this process owns alone, more for one shared by
    /// replicas, where a younger file may be another replica's work in progress.
    pub fn sweep(&self, known: &HashSet<String>, min_age: Duration) -> io::Result<usize> {
        let old_enough = |path: &Path| {
            min_age.is_zero()
                || std::fs::symlink_metadata(path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= min_age))
        };
        let mut removed = 0;
        for entry in std::fs::read_dir(self.tmp_dir())? {
            let path = entry?.path();
            if !old_enough(&path) {
                continue;
            }
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
            removed += 1;
        }
        for shard in std::fs::read_dir(self.blob_root())? {
            let shard = shard?.path();
            if !shard.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(&shard)? {
                let path = entry?.path();
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                if !known.contains(&format!("sha256:{name}")) && old_enough(&path) {
                    std::fs::remove_file(&path)?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// fsync a directory so a rename inside it survives a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
