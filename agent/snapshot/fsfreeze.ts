/**
 * fsfreeze(8) around a snapshot, plus the mount-table lookups that make it
 * safe: FIFREEZE freezes the filesystem that *contains* the path, so freezing
 * a directory that is not a mount point (an unmounted volume's empty mount
 * directory) would freeze the host's root filesystem. We only ever freeze a
 * path that is itself a mount point, and never `/`.
 */
import { readFile, realpath } from 'node:fs/promises';
import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';

export interface MountEntry {
  mountPoint: string;
  fstype: string;
  source: string;
  options: string;
  /** major:minor of the mounted filesystem's device as the kernel reports it (field 3 of mountinfo). */
  device: string;
}

/** /proc/self/mountinfo escapes space, tab, newline and backslash as octal. */
function unescapeMountField(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

export async function readMountTable(): Promise<MountEntry[]> {
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  const entries: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    // id parent major:minor root mountpoint options [optional...] - fstype source superoptions
    const [left, right] = line.split(' - ');
    if (!left || !right) continue;
    const l = left.split(' ');
    const r = right.split(' ');
    entries.push({
      mountPoint: unescapeMountField(l[4] ?? ''),
      options: l[5] ?? '',
      fstype: r[0] ?? '',
      source: unescapeMountField(r[1] ?? ''),
      device: l[2] ?? '',
    });
  }
  return entries;
}

/** The topmost mount whose mount point is exactly `dir` (after resolving symlinks), if any. */
export async function findMount(dir: string): Promise<MountEntry | undefined> {
  let real: string;
  try {
    real = await realpath(dir);
  } catch {
    return undefined;
  }
  const table = await readMountTable();
  // Later lines are mounted on top of earlier ones at the same point.
  return table.filter((m) => m.mountPoint === real).at(-1);
}

export async function assertMountpoint(dir: string): Promise<MountEntry> {
  const entry = await findMount(dir);
  if (!entry) {
    throw new BlocksnapError('E_CONFIG', `${dir} is not a mount point: refusing to freeze the filesystem containing it`);
  }
  if (entry.mountPoint === '/') {
    throw new BlocksnapError('E_CONFIG', 'refusing to freeze the root filesystem');
  }
  return entry;
}

const DEFAULT_TIMEOUT_MS = 60_000;

/**
 * Freezes the filesystem mounted at `mountpoint`. Throws E_BUSY if it is
 * already frozen (by someone else: the caller must then not thaw it) and
 * E_SNAPSHOT for any other failure; after a timeout the filesystem may still
 * end up frozen, so callers thaw in a `finally` unless the error is E_BUSY.
 */
export async function freezeFilesystem(mountpoint: string, opts: { timeoutMs?: number } = {}): Promise<void> {
  await assertMountpoint(mountpoint);
  const r = await execa('fsfreeze', ['--freeze', mountpoint], {
    reject: false,
    timeout: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS,
    stdin: 'ignore',
  });
  if (r.exitCode === 0) return;
  const detail = r.timedOut ? 'timed out' : String(r.stderr || r.shortMessage).trim();
  if (/busy/i.test(detail)) {
    throw new BlocksnapError('E_BUSY', `cannot freeze ${mountpoint}: already frozen (${detail})`, { cause: r });
  }
  throw new BlocksnapError('E_SNAPSHOT', `cannot freeze ${mountpoint}: ${detail}`, { cause: r });
}

export type ThawOutcome = 'thawed' | 'not-frozen';

/**
 * Thaws the filesystem mounted at `mountpoint`. The kernel answers EINVAL for
 * a filesystem that is not frozen: that is 'not-frozen', an error unless
 * `ignoreNotFrozen`.
 */
export async function thawFilesystem(
  mountpoint: string,
  opts: { ignoreNotFrozen?: boolean; timeoutMs?: number } = {},
): Promise<ThawOutcome> {
  await assertMountpoint(mountpoint);
  const r = await execa('fsfreeze', ['--unfreeze', mountpoint], {
    reject: false,
    timeout: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS,
    stdin: 'ignore',
  });
  if (r.exitCode === 0) return 'thawed';
  const detail = r.timedOut ? 'timed out' : String(r.stderr || r.shortMessage).trim();
  if (/invalid argument/i.test(detail)) {
    if (opts.ignoreNotFrozen) return 'not-frozen';
    throw new BlocksnapError('E_SNAPSHOT', `cannot thaw ${mountpoint}: it is not frozen`, { cause: r });
  }
  throw new BlocksnapError('E_SNAPSHOT', `cannot thaw ${mountpoint}: ${detail}`, { cause: r });
}
