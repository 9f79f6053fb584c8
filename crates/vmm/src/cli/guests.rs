//! `esvm guests`: list the built-in guests, or write one's ELF image to a file.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;
use thiserror::Error;

use super::output::{Format, OutputError};

#[derive(Args, Debug)]
pub struct GuestsArgs {
    /// Write the built-in guest NAME's ELF64 image to FILE, to inspect it (readelf, objdump),
    /// run it (`esvm run FILE`) or compute its launch digest (`esvm owner verify --guest
    /// FILE`). An existing FILE is not overwritten without --force.
    #[arg(long, num_args = 2, value_names = ["NAME", "FILE"])]
    pub export: Option<Vec<String>>,
    /// With --export: replace FILE if it exists.
    #[arg(long, requires = "export")]
    pub force: bool,
}

#[derive(Debug, Error)]
pub enum GuestsError {
    #[error("there is no built-in guest {name:?}; the built-in guests are: {known}")]
    Unknown { name: String, known: String },
    #[error("{} already exists; refusing to overwrite it (add --force to replace it)", path.display())]
    Exists { path: PathBuf },
    #[error("cannot write the guest image to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// One built-in guest, as `esvm guests` lists it.
#[derive(Debug, Serialize)]
pub struct GuestEntry {
    pub name: &'static str,
    pub description: &'static str,
    /// Size of its ELF image.
    pub bytes: usize,
}

/// What `esvm guests --export` wrote.
#[derive(Debug, Serialize)]
pub struct Exported {
    pub guest: &'static str,
    pub file: PathBuf,
    pub bytes: usize,
}

/// Runs `esvm guests`; returns the exit status.
pub fn run(args: GuestsArgs, format: Format) -> Result<u8, Box<dyn std::error::Error>> {
    match args.export.as_deref() {
        Some([name, file]) => {
            let e = export(name, Path::new(file), args.force)?;
            format.emit(&e, |e| {
                format!(
                    "wrote guest {} ({} bytes) to {}; run it with `esvm run {}`",
                    e.guest,
                    e.bytes,
                    e.file.display(),
                    e.file.display()
                )
            })?;
        }
        _ => format.emit(list().as_slice(), list_text)?,
    }
    Ok(0)
}

/// The built-in guests.
pub fn list() -> Vec<GuestEntry> {
    esvm_guests::list()
        .iter()
        .map(|g| GuestEntry {
            name: g.name,
            description: g.description,
            bytes: g.elf.len(),
        })
        .collect()
}

fn list_text(guests: &[GuestEntry]) -> String {
    guests
        .iter()
        .map(|g| format!("{:<12} {}\n", g.name, g.description))
        .collect()
}

/// Write the built-in guest `name`'s image to `file`; an existing file only if `force`.
pub fn export(name: &str, file: &Path, force: bool) -> Result<Exported, GuestsError> {
    let guest = esvm_guests::builtin(name).ok_or_else(|| GuestsError::Unknown {
        name: name.to_string(),
        known: esvm_guests::list()
            .iter()
            .map(|g| g.name)
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let mut open = std::fs::OpenOptions::new();
    open.write(true);
    if force {
        open.create(true).truncate(true);
    } else {
        // Refused atomically: no window between a check and the write.
        open.create_new(true);
    }
    let write_err = |source| GuestsError::Write {
        path: file.to_path_buf(),
        source,
    };
    let mut f = open.open(file).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            GuestsError::Exists {
                path: file.to_path_buf(),
            }
        } else {
            write_err(e)
        }
    })?;
    f.write_all(guest.elf).map_err(write_err)?;
    f.sync_all().map_err(write_err)?;
    Ok(Exported {
        guest: guest.name,
        file: file.to_path_buf(),
        bytes: guest.elf.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_writes_the_image_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("demo.elf");
        let e = export("demo", &f, false).unwrap();
        let demo = esvm_guests::builtin("demo").unwrap().elf;
        assert_eq!(std::fs::read(&f).unwrap(), demo);
        assert_eq!(e.bytes, demo.len());

        std::fs::write(&f, b"mine").unwrap();
        let err = export("hello", &f, false).unwrap_err();
        assert!(matches!(err, GuestsError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(std::fs::read(&f).unwrap(), b"mine");

        export("hello", &f, true).unwrap();
        assert_eq!(
            std::fs::read(&f).unwrap(),
            esvm_guests::builtin("hello").unwrap().elf
        );

        let err = export("no-such", &dir.path().join("x"), false).unwrap_err();
        assert!(err.to_string().contains("demo"), "{err}");
        assert!(!dir.path().join("x").exists());
    }

    #[test]
    fn the_list_names_every_guest_in_both_formats() {
        let l = list();
        assert_eq!(l.len(), esvm_guests::list().len());
        let text = Format::Human.render(l.as_slice(), list_text).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&Format::Json.render(l.as_slice(), list_text).unwrap()).unwrap();
        for (i, g) in esvm_guests::list().iter().enumerate() {
            assert!(text.lines().any(|line| line.starts_with(g.name)), "{text}");
            assert_eq!(json[i]["name"], g.name);
            assert_eq!(json[i]["bytes"], g.elf.len());
        }
    }
}
