//! A scratch directory for the unit tests that read files, removed when the test ends.

use std::path::PathBuf;

pub(crate) struct Dir(pub(crate) PathBuf);

impl Dir {
    /// A new directory named after `name` and this process.
    pub(crate) fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("dp-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    /// Writes the file `name` in it.
    pub(crate) fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
