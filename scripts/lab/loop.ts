/**
 * Loop devices for tests. Other engineers attach loop devices on the same
 * machine at the same time, and a freed /dev/loopN is handed to the next
 * caller at once: a device is only ever detached after checking that it is
 * still backed by the file we attached (sysfs `loop/backing_file`).
 */
import { readFile, readdir, realpath } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';

export interface AttachLoopOptions {
  /** `losetup --direct-io=on`: writes go straight to the file (LAB.md). */
  directIo?: boolean;
  readOnly?: boolean;
}

function sysLoopDir(device: string): string {
  return `/sys/block/${path.basename(device)}/loop`;
}

/** The file behind a loop device, or undefined if the device is free or missing. */
export async function loopBackingFile(device: string): Promise<string | undefined> {
  try {
    const raw = (await readFile(`${sysLoopDir(device)}/backing_file`, 'utf8')).trim();
    return raw.replace(/ \(deleted\)$/, '');
  } catch {
    return undefined;
  }
}

export async function loopDirectIo(device: string): Promise<boolean> {
  return (await readFile(`${sysLoopDir(device)}/dio`, 'utf8')).trim() === '1';
}

/** Every loop device currently backed by `file` (as the kernel names it: an absolute real path). */
export async function findLoopsByBackingFile(file: string): Promise<string[]> {
  const names = (await readdir('/sys/block')).filter((n) => /^loop\d+$/.test(n));
  const found: string[] = [];
  for (const n of names) {
    if ((await loopBackingFile(n)) === file) found.push(`/dev/${n}`);
  }
  return found.sort();
}

/** Attaches `file` to the first free loop device and returns its path ('/dev/loopN'). */
export async function attachLoop(file: string, opts: AttachLoopOptions = {}): Promise<string> {
  const args = ['--find', '--show'];
  if (opts.directIo) args.push('--direct-io=on');
  if (opts.readOnly) args.push('--read-only');
  args.push(file);
  const r = await execa('losetup', args, { reject: false, stdin: 'ignore', timeout: 30_000 });
  const device = String(r.stdout).trim();
  if (r.exitCode !== 0 || !/^\/dev\/loop\d+$/.test(device)) {
    throw new BlocksnapError('E_DEVICE', `losetup ${args.join(' ')} failed: ${String(r.stderr || r.shortMessage).trim()}`, { cause: r });
  }
  if (opts.directIo && !(await loopDirectIo(device).catch(() => false))) {
    await detachLoop(device, { backingFile: await realpath(file) }).catch(() => undefined);
    throw new BlocksnapError('E_DEVICE', `direct I/O could not be enabled on ${device} for ${file}`);
  }
  return device;
}

export type DetachOutcome = 'detached' | 'absent';

/**
 * Detaches `device` and waits until the kernel has let go of it. With
 * `backingFile`, a device no longer backed by that file is left alone
 * ('absent': someone else may own it now).
 */
export async function detachLoop(device: string, opts: { backingFile?: string; timeoutMs?: number } = {}): Promise<DetachOutcome> {
  const current = await loopBackingFile(device);
  if (current === undefined) return 'absent';
  if (opts.backingFile !== undefined && current !== opts.backingFile) return 'absent';
  const r = await execa('losetup', ['--detach', device], { reject: false, stdin: 'ignore', timeout: 30_000 });
  if (r.exitCode !== 0) {
    if ((await loopBackingFile(device)) === undefined) return 'detached';
    throw new BlocksnapError('E_DEVICE', `losetup --detach ${device} failed: ${String(r.stderr || r.shortMessage).trim()}`, { cause: r });
  }
  // The kernel defers the release (autoclear) while something still holds
  // the device open (a mount, a udev probe): wait for it to really go.
  const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
  while ((await loopBackingFile(device)) === current) {
    if (Date.now() > deadline) {
      throw new BlocksnapError('E_BUSY', `${device} is still attached to ${current} after detach: is it still mounted or open?`);
    }
    await new Promise((res) => setTimeout(res, 25));
  }
  return 'detached';
}
