//! The guest kernel: Debian 12's cloud kernel (6.1), downloaded with apt and unpacked
//! into the cache, never installed on the host.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

/// Meta package that always depends on the current Debian 12 cloud kernel image.
const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// The datapath's support floor is 6.1; a different series would silently test
/// something else, so it is refused.
const KERNEL_SERIES: &str = "6.1.";

/// Marker written last, so a half-extracted cache is never mistaken for a good one.
const STAMP: &str = ".rampart-kernel-release";

/// An unpacked guest kernel.
#[derive(Debug, Clone)]
pub struct KernelFiles {
    /// `uname -r` of the guest, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The bzImage qemu boots.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the unpacked package.
    pub modules_dir: PathBuf,
}

/// Makes sure the kernel is unpacked in `cache_dir` and returns its files.
///
/// Idempotent and offline once cached; the first call needs apt (and runs
/// `apt-get update` if the package lists are missing). Delete `cache_dir` to pick up
/// a newer Debian kernel.
pub fn ensure_kernel(cache_dir: &Path) -> Result<KernelFiles> {
    let root = cache_dir.join("kernel");
    if let Ok(release) = fs::read_to_string(root.join(STAMP)) {
        return files(&root, release.trim());
    }

    fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating cache dir {}", cache_dir.display()))?;
    let package = image_package()?;
    let download = cache_dir.join("download");
    fs::create_dir_all(&download)?;
    let deb = download_deb(&package, &download)?;

    // Extract beside the final location and rename, so concurrent runs never see a
    // partial tree.
    let staging = cache_dir.join(format!("kernel.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&staging))?;
    let release = release_in(&staging)?;
    ensure!(
        release.starts_with(KERNEL_SERIES),
        "{package} unpacks kernel {release}, expected the {KERNEL_SERIES}x series (Debian 12); \
         is apt pointed at bookworm?"
    );
    fs::write(staging.join(STAMP), &release)?;
    if let Err(err) = fs::rename(&staging, &root) {
        // Another run won the race; its tree is as good as ours.
        let _ = fs::remove_dir_all(&staging);
        if !root.join(STAMP).exists() {
            return Err(err).with_context(|| format!("moving kernel into {}", root.display()));
        }
    }
    // The unpacked tree is all later runs need.
    let _ = fs::remove_dir_all(&download);
    let release = fs::read_to_string(root.join(STAMP))?;
    files(&root, release.trim())
}

fn files(root: &Path, release: &str) -> Result<KernelFiles> {
    let kernel = KernelFiles {
        release: release.to_owned(),
        vmlinuz: root.join(format!("boot/vmlinuz-{release}")),
        modules_dir: root.join(format!("lib/modules/{release}")),
    };
    ensure!(
        kernel.vmlinuz.is_file() && kernel.modules_dir.is_dir(),
        "kernel cache {} is incomplete; delete it and retry",
        root.display()
    );
    Ok(kernel)
}

/// Resolves the meta package to the versioned image package that holds the files.
fn image_package() -> Result<String> {
    let lookup = || -> Result<Option<String>> {
        let out = Command::new("apt-cache")
            .args(["depends", META_PACKAGE])
            .output()
            .context("running apt-cache (is this a Debian host?)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|dep| dep.starts_with("linux-image-"))
            .map(str::to_owned))
    };
    if let Some(package) = lookup()? {
        return Ok(package);
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    lookup()?.with_context(|| format!("apt knows no {META_PACKAGE}; is Debian main configured?"))
}

fn download_deb(package: &str, dir: &Path) -> Result<PathBuf> {
    let find = || -> Result<Option<PathBuf>> {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with(&format!("{package}_")) && name.ends_with(".deb") {
                return Ok(Some(path));
            }
        }
        Ok(None)
    };
    if let Some(deb) = find()? {
        return Ok(deb);
    }
    // The sandbox user cannot write into an arbitrary cache dir; downloading as the
    // caller is what we want here anyway.
    run(Command::new("apt-get")
        .args(["download", "-q", "-o", "APT::Sandbox::User=root", package])
        .current_dir(dir))?;
    find()?.with_context(|| {
        format!(
            "apt-get download left no {package} .deb in {}",
            dir.display()
        )
    })
}

fn release_in(root: &Path) -> Result<String> {
    let dir = root.join("lib/modules");
    let mut releases = fs::read_dir(&dir)
        .with_context(|| format!("no {} in the kernel package", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned());
    let release = releases
        .next()
        .context("kernel package has no modules dir")?;
    ensure!(
        releases.next().is_none(),
        "kernel package holds several releases"
    );
    Ok(release)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

/// A module ready to be put in the initramfs: its name and uncompressed contents.
pub struct Module {
    pub name: String,
    pub contents: Vec<u8>,
}

/// Returns `wanted` plus everything they depend on, dependencies first.
///
/// The package ships no modules.dep (depmod runs at install time), so dependencies
/// come from each module's own `.modinfo` `depends=` entry.
pub fn modules_in_load_order(kernel: &KernelFiles, wanted: &[&str]) -> Result<Vec<Module>> {
    let mut index = HashMap::new();
    index_modules(&kernel.modules_dir.join("kernel"), &mut index)?;

    let mut ordered = Vec::new();
    let mut state = HashMap::new();
    for name in wanted {
        visit(&normalise(name), &index, &mut state, &mut ordered)?;
    }
    Ok(ordered)
}

#[derive(Clone, Copy, PartialEq)]
enum Visit {
    InProgress,
    Done,
}

fn visit(
    name: &str,
    index: &HashMap<String, PathBuf>,
    state: &mut HashMap<String, Visit>,
    ordered: &mut Vec<Module>,
) -> Result<()> {
    match state.get(name) {
        Some(Visit::Done) => return Ok(()),
        Some(Visit::InProgress) => bail!("module dependency cycle through {name}"),
        None => {}
    }
    let path = index
        .get(name)
        .with_context(|| format!("module {name} is not in the kernel package (built in?)"))?;
    state.insert(name.to_owned(), Visit::InProgress);
    let contents = read_module(path)?;
    for dep in depends(&contents) {
        visit(&dep, index, state, ordered)?;
    }
    state.insert(name.to_owned(), Visit::Done);
    ordered.push(Module {
        name: name.to_owned(),
        contents,
    });
    Ok(())
}

fn index_modules(dir: &Path, index: &mut HashMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, index)?;
            continue;
        }
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
            .iter()
            .find_map(|ext| file.strip_suffix(ext));
        if let Some(stem) = stem {
            index.insert(normalise(stem), path.clone());
        }
    }
    Ok(())
}

/// The kernel treats `-` and `_` in module names alike; file names use either.
fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// busybox insmod cannot be relied on for compressed modules; decompress on the host.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    let Some(tool) = tool else {
        return fs::read(path).with_context(|| format!("reading {name}"));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} to decompress {name}"))?;
    ensure!(out.status.success(), "{tool} -dc {name} failed");
    Ok(out.stdout)
}

/// The `depends=a,b` entry of a module's `.modinfo` section (NUL-separated
/// `key=value` strings). A module that is not a parsable ELF64 yields no
/// dependencies; insmod then names whatever is missing.
fn depends(module: &[u8]) -> Vec<String> {
    let Some(modinfo) = elf_section(module, b".modinfo") else {
        return Vec::new();
    };
    modinfo
        .split(|&b| b == 0)
        .find_map(|entry| entry.strip_prefix(b"depends="))
        .map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(normalise)
                .collect()
        })
        .unwrap_or_default()
}

/// Contents of the named section of a little-endian ELF64 file.
fn elf_section<'a>(elf: &'a [u8], wanted: &[u8]) -> Option<&'a [u8]> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| {
        let v = u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?);
        usize::try_from(v).ok()
    };
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = u64_at(0x28)?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    // (name offset, file offset, size) of section `i`.
    let header = |i: usize| {
        let at = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((u32_at(at)? as usize, u64_at(at + 0x18)?, u64_at(at + 0x20)?))
    };
    let (_, strtab, _) = header(shstrndx)?;
    (0..shnum).find_map(|i| {
        let (name, offset, size) = header(i)?;
        let name_start = strtab.checked_add(name)?;
        let name_bytes = elf.get(name_start..)?;
        let name_bytes = &name_bytes[..name_bytes.iter().position(|&b| b == 0)?];
        (name_bytes == wanted).then(|| elf.get(offset..offset.checked_add(size)?))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_reads_the_modinfo_section_of_a_real_elf() {
        // Any ELF on the host works as a fixture for the section walk; it has no
        // .modinfo, so the answer must be "no dependencies" rather than garbage.
        let exe = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(elf_section(&exe, b".text").is_some_and(|t| !t.is_empty()));
        assert!(elf_section(&exe, b".modinfo").is_none());
        assert!(depends(&exe).is_empty());
        assert!(depends(b"not an elf").is_empty());
    }
}
