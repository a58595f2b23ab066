//! A kernel text file (`/proc/stat`, `/proc/loadavg`, ...) kept open and read again from its start at every
//! sample: the kernel regenerates it on each read from offset 0, and the agent saves the path lookup, the
//! open, the size probe and the close, and reuses one buffer, every second of the VM's life.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};

#[derive(Debug, Default)]
pub struct Reread {
    open: Option<(PathBuf, File)>,
    text: String,
}

impl Reread {
    /// The file's whole text now. It is opened on first use (and again after an error, or if `path`
    /// changes).
    pub fn read(&mut self, path: &Path) -> io::Result<&str> {
        if self.open.as_ref().is_none_or(|(open, _)| open != path) {
            self.open = Some((path.to_path_buf(), File::open(path)?));
        }
        let (_, file) = self.open.as_mut().expect("opened above");
        self.text.clear();
        let result = file.rewind().and_then(|()| file.read_to_string(&mut self.text));
        if let Err(e) = result {
            self.open = None;
            return Err(e);
        }
        Ok(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_read_sees_the_file_as_it_is_now() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loadavg");
        std::fs::write(&path, "0.10 0.20 0.30 1/100 42\n").unwrap();
        let mut file = Reread::default();
        assert_eq!(file.read(&path).unwrap(), "0.10 0.20 0.30 1/100 42\n");
        std::fs::write(&path, "1.5 0.2 0.3 1/100 43\n").unwrap();
        assert_eq!(
            file.read(&path).unwrap(),
            "1.5 0.2 0.3 1/100 43\n",
            "shorter now: no stale tail"
        );
    }

    #[test]
    fn the_live_proc_files_read_again_from_the_start() {
        let mut stat = Reread::default();
        let first = stat.read(Path::new("/proc/stat")).unwrap().to_string();
        let second = stat.read(Path::new("/proc/stat")).unwrap();
        assert!(first.starts_with("cpu ") && second.starts_with("cpu "), "{second}");
    }

    #[test]
    fn a_missing_file_is_an_error_and_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cpu.stat");
        let mut file = Reread::default();
        assert!(file.read(&path).is_err());
        std::fs::write(&path, "usage_usec 5\n").unwrap();
        assert_eq!(file.read(&path).unwrap(), "usage_usec 5\n");
    }
}
