//! Temp files that clean up after themselves, and a writer that hashes what it writes.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::digest::{Digest, Hasher};

/// A file under `tmp/` that is deleted on drop unless [`TempFile::persist`] moved it.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    pub fn create(dir: &Path, purpose: &str) -> io::Result<Self> {
        let path = dir.join(format!("{purpose}-{}.tmp", uuid::Uuid::new_v4().simple()));
        std::fs::File::create(&path)?;
        Ok(Self { path, keep: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames into place; the file must already be fsynced.
    pub fn persist(mut self, dest: &Path) -> io::Result<()> {
        std::fs::rename(&self.path, dest)?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Buffered file writer that hashes and counts every byte; `finish` fsyncs.
pub struct HashingWriter {
    inner: io::BufWriter<std::fs::File>,
    hasher: Hasher,
    written: u64,
}

impl HashingWriter {
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self {
            inner: io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?),
            hasher: Hasher::default(),
            written: 0,
        })
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Flushes, fsyncs and returns the digest and size of everything written.
    pub fn finish(self) -> io::Result<(Digest, u64)> {
        let file = self.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok((self.hasher.finish(), self.written))
    }
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
