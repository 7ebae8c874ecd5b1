/**
 * Loop devices over the FUSE file nbdfuse exposes. Other software attaches
 * loop devices on the same host and a freed /dev/loopN is handed to the next
 * caller at once, so a device is only detached while sysfs still names our
 * backing file, and found again by that file when the record has no device
 * (the agent was killed between losetup and writing its answer down).
 */
import { readFile, readdir } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function backingOf(device: string): Promise<string | undefined> {
  try {
    const raw = (await readFile(`/sys/block/${path.basename(device)}/loop/backing_file`, 'utf8')).trim();
    return raw.replace(/ \(deleted\)$/, '');
  } catch {
    return undefined;
  }
}

export async function loopsBackedBy(file: string): Promise<string[]> {
  const names = (await readdir('/sys/block')).filter((n) => /^loop\d+$/.test(n));
  const out: string[] = [];
  for (const n of names) if ((await backingOf(n)) === file) out.push(`/dev/${n}`);
  return out.sort();
}

export function losetupArgs(file: string, o: { readOnly: boolean; directIo: boolean }): string[] {
  return ['--find', '--show', `--direct-io=${o.directIo ? 'on' : 'off'}`, ...(o.readOnly ? ['--read-only'] : []), file];
}

export async function attachLoopDevice(file: string, o: { readOnly: boolean; directIo: boolean }): Promise<string> {
  const args = losetupArgs(file, o);
  const r = await execa('losetup', args, { reject: false, stdin: 'ignore', timeout: 30_000 });
  const device = String(r.stdout).trim();
  if (r.exitCode !== 0 || !/^\/dev\/loop\d+$/.test(device)) {
    throw new BlocksnapError('E_DEVICE', `losetup ${args.join(' ')} failed: ${String(r.stderr || r.shortMessage).trim()}`, { cause: r });
  }
  return device;
}

/** Detaches every loop device (the recorded one, else any) still backed by `backingFile`, and waits until the kernel let go. */
export async function detachLoopOf(backingFile: string, device?: string): Promise<'released' | 'absent'> {
  const devices = device && (await backingOf(device)) === backingFile ? [device] : await loopsBackedBy(backingFile);
  if (!devices.length) return 'absent';
  for (const d of devices) {
    const r = await execa('losetup', ['--detach', d], { reject: false, stdin: 'ignore', timeout: 30_000 });
    if (r.exitCode !== 0 && (await backingOf(d)) === backingFile) {
      throw new BlocksnapError('E_DEVICE', `losetup --detach ${d} failed: ${String(r.stderr).trim()}`, { cause: r });
    }
    // The kernel defers the release while the device is still open (udev probes it): wait for it.
    const end = Date.now() + 30_000;
    while ((await backingOf(d)) === backingFile) {
      if (Date.now() > end) throw new BlocksnapError('E_DEVICE', `${d} is still backed by ${backingFile} after detach`);
      await sleep(20);
    }
  }
  return 'released';
}
