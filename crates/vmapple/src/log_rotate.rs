//! A log file with a size cap: when the next line would take `vmapple.log`
//! past [`LOG_CAP`], it becomes `vmapple.log.1` (replacing the previous
//! one) and a new `vmapple.log` starts. A bundle's logs therefore never take
//! more than twice the cap, however long it runs or however noisy its guest
//! is, and the newest lines are always kept.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Size at which `vmapple.log` is rotated.
pub const LOG_CAP: u64 = 8 << 20;

/// Opens (appending, creating) the file at a path.
pub type Opener = fn(&Path) -> io::Result<File>;

pub struct RotatingLog {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    cap: u64,
    open: Opener,
}

impl RotatingLog {
    /// Appends to `path`, opened by `open` now and again at each rotation.
    pub fn open(path: &Path, cap: u64, open: Opener) -> io::Result<Self> {
        let file = open(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file: Some(file),
            written,
            cap,
            open,
        })
    }

    /// The previous file's name: `vmapple.log.1`.
    pub fn rotated_path(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".1");
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        std::fs::rename(&self.path, Self::rotated_path(&self.path))?;
        self.file = Some((self.open)(&self.path)?);
        self.written = 0;
        Ok(())
    }

    /// Writes one event's text whole, rotating first if it would cross the
    /// cap. A rotation that fails stops file logging (stderr still has
    /// everything) rather than letting the file grow without bound.
    pub fn write_event(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.written > 0 && self.written + buf.len() as u64 > self.cap {
            if let Err(e) = self.rotate() {
                self.file = None;
                // Not through tracing: this runs inside its writer.
                eprintln!(
                    "vmapple: cannot rotate {}: {e}; no more file logging",
                    self.path.display()
                );
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.write_all(buf)?;
        self.written += buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(path: &Path) -> io::Result<File> {
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
    }

    #[test]
    fn rotates_at_the_cap_keeping_whole_lines_and_the_newest() {
        let dir = std::env::temp_dir().join(format!("vmapple-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vmapple.log");
        // An earlier run left 500 bytes.
        std::fs::write(&path, format!("{:499}\n", "old run")).unwrap();
        let mut log = RotatingLog::open(&path, 1000, append).unwrap();
        for i in 0..100 {
            log.write_event(format!("line {i:03} {:90}\n", "").as_bytes())
                .unwrap();
        }
        let current = std::fs::read_to_string(&path).unwrap();
        let previous = std::fs::read_to_string(RotatingLog::rotated_path(&path)).unwrap();
        assert!(current.len() <= 1000 && previous.len() <= 1000);
        assert!(current.ends_with(&format!("line 099 {:90}\n", "")));
        // The two files hold the newest lines, whole and in order.
        let lines: Vec<&str> = previous.lines().chain(current.lines()).collect();
        assert!(lines.iter().all(|l| l.len() == 99), "whole lines");
        let first: usize = lines[0][5..8].parse().unwrap();
        for (k, l) in lines.iter().enumerate() {
            assert_eq!(l[5..8].parse::<usize>().unwrap(), first + k);
        }
        assert_eq!(first + lines.len(), 100);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2, "no more files");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_rotation_stops_file_logging_instead_of_growing() {
        let dir = std::env::temp_dir().join(format!("vmapple-rotate-fail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vmapple.log");
        let mut log = RotatingLog::open(&path, 100, append).unwrap();
        log.write_event(&[b'a'; 80]).unwrap();
        // A directory where vmapple.log.1 would go: the rename fails.
        std::fs::create_dir(RotatingLog::rotated_path(&path)).unwrap();
        std::fs::write(RotatingLog::rotated_path(&path).join("x"), b"").unwrap();
        for _ in 0..10 {
            log.write_event(&[b'b'; 80]).unwrap();
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 80);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
