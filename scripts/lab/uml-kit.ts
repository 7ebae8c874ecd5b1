/**
 * The user-mode-linux lab's kit (../shared/LAB.md, "Real LVM … in a
 * user-mode-linux guest"): Debian's UML kernel, its device-mapper modules,
 * lvm2, thin-provisioning-tools, kmod and slirp, fetched with `apt-get
 * download` and unpacked with `dpkg -x` — nothing is installed on the host.
 *
 * Layout of the cache (kept between runs, like apt's own; delete the folder to refetch):
 *   KIT/debs/*.deb    what apt downloaded
 *   KIT/root/         the unpacked layer the guest puts over the host's `/`
 *                     (merged-/usr: bin, sbin, lib folded into usr/, the UML
 *                     modules moved to usr/lib/modules/<version>)
 *   KIT/root/.ready   written last: the layer is complete
 * A half-made kit (killed mid-unpack) has no `.ready` and is rebuilt.
 */
import { existsSync } from 'node:fs';
import { mkdir, readdir, rename, rm, writeFile, cp } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';

export const UML_PACKAGES = [
  'user-mode-linux', 'lvm2', 'dmeventd', 'libdevmapper-event1.02.1', 'liblvm2cmd2.03', 'thin-provisioning-tools', 'kmod', 'slirp', 'libaio1',
] as const;

export const DEFAULT_KIT_DIR = process.env.BLOCKSNAP_UML_KIT ?? '/var/cache/blocksnap-uml';

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
  if (existsSync(path.join(kitDir, 'root', '.ready'))) return null;
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
  const root = path.join(kitDir, 'root');
  if (!existsSync(path.join(root, '.ready'))) {
    const debs = path.join(kitDir, 'debs');
    await mkdir(debs, { recursive: true });
    const have = await readdir(debs);
    const missing = UML_PACKAGES.filter((p) => !have.some((f) => f.startsWith(`${p}_`)));
    if (missing.length) {
      try {
        await execa('apt-get', ['download', ...missing], { cwd: debs, stdin: 'ignore' });
      } catch (e) {
        throw new BlocksnapError('E_INTERNAL', `apt-get download ${missing.join(' ')} failed`, { cause: e });
      }
    }
    const tmp = `${root}.tmp-${process.pid}`;
    await rm(tmp, { recursive: true, force: true });
    await mkdir(tmp, { recursive: true });
    for (const f of (await readdir(debs)).filter((f) => f.endsWith('.deb'))) {
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
    await rm(root, { recursive: true, force: true });
    await rename(tmp, root);
    await writeFile(path.join(root, '.ready'), new Date().toISOString());
  }
  const version = (await readdir(path.join(root, 'usr', 'lib', 'modules')))[0]!;
  return {
    dir: kitDir, root, version,
    kernel: path.join(root, 'usr', 'bin', 'linux.uml'),
    slirp: path.join(root, 'usr', 'bin', 'slirp-fullbolt'),
  };
}
