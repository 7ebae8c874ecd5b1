/**
 * The user-mode-linux lab's kit (../shared/LAB.md, "Real LVM … in a
 * user-mode-linux guest"): Debian's UML kernel, its device-mapper modules,
 * lvm2, dmsetup, thin-provisioning-tools, kmod and slirp, fetched with
 * `apt-get download` and unpacked with `dpkg -x` — nothing is installed on
 * the host. On a fresh machine apt's package lists may be empty: a failed
 * download runs `apt-get update` once and tries again.
 *
 * Layout of the cache (kept between runs, like apt's own; delete the folder
 * to refetch; `BLOCKSNAP_UML_KIT` overrides the folder):
 *   KIT/debs/*.deb        what apt downloaded
 *   KIT/root-<hash>/      the unpacked layer the guest puts over the host's `/`
 *                         (merged-/usr: bin, sbin, lib folded into usr/, the UML
 *                         modules moved to usr/lib/modules/<version>); <hash>
 *                         names the package list, so a changed list makes a new
 *                         layer and never touches one a running guest has mounted
 *   KIT/root-<hash>/.ready  written before the layer is renamed into place
 * Test files in parallel processes may build at once: each downloads into and
 * unpacks to its own temporary folder and renames it into place; the first
 * rename wins, the others use it.
 */
import { existsSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, rename, rm, writeFile, cp } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';

export const UML_PACKAGES = [
  'user-mode-linux', 'lvm2', 'dmeventd', 'libdevmapper-event1.02.1', 'liblvm2cmd2.03', 'thin-provisioning-tools', 'kmod', 'slirp', 'libaio1',
  // lvm2 needs libdevmapper, and the providers run dmsetup: present on this machine's image, not guaranteed elsewhere.
  'dmsetup', 'libdevmapper1.02.1',
] as const;

export const DEFAULT_KIT_DIR = process.env.BLOCKSNAP_UML_KIT ?? '/var/cache/blocksnap-uml';

/** The unpacked layer's folder for the current package list. */
export function kitRoot(kitDir = DEFAULT_KIT_DIR): string {
  return path.join(kitDir, `root-${createHash('sha256').update(UML_PACKAGES.join(' ')).digest('hex').slice(0, 12)}`);
}

export interface UmlKit {
  dir: string;
  /** The unpacked layer (hostfs-mounted in the guest). */
  root: string;
  kernel: string;
  slirp: string;
  /** Kernel version (the modules folder's name). */
  version: string;
}

/** Why the lab cannot run here, or null. Used by tests to skip with a clear message. */
export async function umlUnavailable(kitDir = DEFAULT_KIT_DIR): Promise<string | null> {
  if (process.platform !== 'linux') return 'user-mode-linux needs a Linux host';
  if (existsSync(path.join(kitRoot(kitDir), '.ready'))) return null;
  try {
    await execa('apt-get', ['--version'], { stdin: 'ignore' });
  } catch {
    return 'no apt-get on this machine to download user-mode-linux and lvm2';
  }
  try {
    await ensureUmlKit(kitDir);
    return null;
  } catch (e) {
    return `cannot download the user-mode-linux kit (${(e as Error).message.split('\n')[0]})`;
  }
}

let pending: Promise<UmlKit> | null = null;

/** The kit, downloaded and unpacked once (cached under `kitDir`). */
export function ensureUmlKit(kitDir = DEFAULT_KIT_DIR): Promise<UmlKit> {
  pending ??= build(kitDir).finally(() => (pending = null));
  return pending;
}

async function build(kitDir: string): Promise<UmlKit> {
  const root = kitRoot(kitDir);
  if (!existsSync(path.join(root, '.ready'))) {
    const debs = path.join(kitDir, 'debs');
    await mkdir(debs, { recursive: true });
    await download(debs);
    const tmp = await mkdtemp(`${root}.tmp-`);
    try {
      for (const f of (await readdir(debs)).filter((f) => f.endsWith('.deb') && UML_PACKAGES.some((p) => f.startsWith(`${p}_`)))) {
        await execa('dpkg', ['-x', path.join(debs, f), tmp], { stdin: 'ignore' });
      }
      // Merged-/usr host: a top-level bin/sbin/lib in the overlay would hide the host's symlinks.
      for (const d of ['bin', 'sbin', 'lib']) {
        const top = path.join(tmp, d);
        if (!existsSync(top)) continue;
        await cp(top, path.join(tmp, 'usr', d), { recursive: true, force: true, verbatimSymlinks: true });
        await rm(top, { recursive: true, force: true });
      }
      const umlModules = path.join(tmp, 'usr', 'lib', 'uml', 'modules');
      const [version] = await readdir(umlModules);
      if (!version) throw new BlocksnapError('E_INTERNAL', 'the user-mode-linux package has no modules folder');
      await mkdir(path.join(tmp, 'usr', 'lib', 'modules'), { recursive: true });
      await rename(path.join(umlModules, version), path.join(tmp, 'usr', 'lib', 'modules', version));
      await writeFile(path.join(tmp, '.version'), version);
      await writeFile(path.join(tmp, '.ready'), `${new Date().toISOString()} ${UML_PACKAGES.join(' ')}\n`);
      // Atomic: a rename onto an existing non-empty folder fails, so a layer another process put in place first stays.
      await rename(tmp, root).catch((e: NodeJS.ErrnoException) => {
        if (!existsSync(path.join(root, '.ready'))) throw e;
      });
    } finally {
      await rm(tmp, { recursive: true, force: true });
    }
  }
  const version = (await readdir(path.join(root, 'usr', 'lib', 'modules')))[0]!;
  return {
    dir: kitDir, root, version,
    kernel: path.join(root, 'usr', 'bin', 'linux.uml'),
    slirp: path.join(root, 'usr', 'bin', 'slirp-fullbolt'),
  };
}

/** Downloads the packages not yet in `debs` (through a private folder: parallel builders never see half a file). */
async function download(debs: string): Promise<void> {
  const have = await readdir(debs);
  const missing = UML_PACKAGES.filter((p) => !have.some((f) => f.startsWith(`${p}_`)));
  if (!missing.length) return;
  const tmp = await mkdtemp(path.join(debs, '.dl-'));
  try {
    // A fresh machine may have no package lists yet ("Unable to locate package"): update and try again.
    // Another test process may hold apt's lists lock while it updates: retry until the deadline.
    const deadline = Date.now() + 120_000;
    for (let attempt = 0; ; attempt++) {
      const got = await execa('apt-get', ['download', ...missing], { cwd: tmp, stdin: 'ignore', reject: false });
      if (got.exitCode === 0) break;
      if (Date.now() > deadline) {
        throw new BlocksnapError('E_INTERNAL', `apt-get download ${missing.join(' ')} failed: ${String(got.stderr).trim().split('\n').at(-1)}`, { cause: got });
      }
      const upd = await execa('apt-get', ['update', '-qq'], { stdin: 'ignore', reject: false });
      if (upd.exitCode !== 0) await new Promise((r) => setTimeout(r, Math.min(10_000, 1000 * 2 ** attempt)));
    }
    for (const f of await readdir(tmp)) if (f.endsWith('.deb')) await rename(path.join(tmp, f), path.join(debs, f));
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}
