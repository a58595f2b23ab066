//! The NoCloud seed a qemu member boots with: a FAT volume labelled `cidata` holding `meta-data` (the
//! instance id, which is the member id, and the host name) and `user-data` (ebb's enrolment beside the
//! operator's part), as cloud-init's NoCloud datasource reads it from a disk.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

/// FAT needs some room around the files; user data is at most `MAX_USER_DATA_BYTES`.
const SEED_BYTES: u64 = 2 * 1024 * 1024;

/// The most user data a seed takes (its FAT volume has room for this and the metadata).
pub const MAX_USER_DATA_BYTES: usize = 1024 * 1024;

/// `meta-data` for `member_id`: cloud-init runs its first-boot modules once per instance id.
pub fn meta_data(member_id: &str) -> String {
    format!("instance-id: {member_id}\nlocal-hostname: {member_id}\n")
}

/// Writes the seed image at `path` (owner-only: the user data holds a join token).
pub fn write(path: &Path, member_id: &str, user_data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if user_data.len() > MAX_USER_DATA_BYTES {
        return Err(std::io::Error::other(format!(
            "the user data is {} bytes; a NoCloud seed takes at most {MAX_USER_DATA_BYTES}",
            user_data.len()
        )));
    }
    let mut image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    image.set_len(SEED_BYTES)?;
    fatfs::format_volume(
        &mut image,
        fatfs::FormatVolumeOptions::new().volume_label(*b"cidata     "),
    )?;
    image.seek(SeekFrom::Start(0))?;
    {
        let volume = fatfs::FileSystem::new(&mut image, fatfs::FsOptions::new())?;
        let root = volume.root_dir();
        root.create_file("meta-data")?
            .write_all(meta_data(member_id).as_bytes())?;
        root.create_file("user-data")?.write_all(user_data)?;
        drop(root);
        volume.unmount()?;
    }
    image.sync_all()
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn read(path: &Path, name: &str) -> Vec<u8> {
        let image = std::fs::File::open(path).unwrap();
        let volume = fatfs::FileSystem::new(image, fatfs::FsOptions::new()).unwrap();
        let mut bytes = Vec::new();
        volume
            .root_dir()
            .open_file(name)
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        bytes
    }

    #[test]
    fn a_seed_is_a_cidata_volume_with_the_member_and_its_user_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        let user_data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        write(&path, "web-3", &user_data).unwrap();
        assert_eq!(
            read(&path, "user-data"),
            user_data,
            "byte for byte, binary (gzip) included"
        );
        assert_eq!(read(&path, "meta-data"), b"instance-id: web-3\nlocal-hostname: web-3\n");
        let volume = fatfs::FileSystem::new(std::fs::File::open(&path).unwrap(), fatfs::FsOptions::new()).unwrap();
        assert_eq!(
            volume.volume_label().trim_end(),
            "cidata",
            "NoCloud looks for this label"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn too_much_user_data_is_refused_not_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let error = write(
            &dir.path().join("seed.img"),
            "web-1",
            &vec![b'x'; MAX_USER_DATA_BYTES + 1],
        )
        .unwrap_err();
        assert!(error.to_string().contains("at most"), "{error}");
    }
}
