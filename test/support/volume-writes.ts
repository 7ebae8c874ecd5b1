import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';

/**
 * Writes made to a test volume from outside PostgreSQL and outside the agent
 * (the tracker must see them like any other write).
 */

/** `dd` of `count` blocks of `bs` bytes into `file` (created or overwritten), then `sync`. */
export async function ddWrite(
  file: string, opts: { bs: number; count: number; seek?: number; source?: '/dev/urandom' | '/dev/zero'; direct?: boolean; noTruncate?: boolean },
): Promise<void> {
  const args = [`if=${opts.source ?? '/dev/urandom'}`, `of=${file}`, `bs=${opts.bs}`, `count=${opts.count}`, 'status=none'];
  if (opts.seek) args.push(`seek=${opts.seek}`);
  const conv = opts.noTruncate ? ['notrunc'] : [];
  if (conv.length) args.push(`conv=${conv.join(',')}`);
  if (opts.direct) args.push('oflag=direct');
  await execa('dd', args, { stdin: 'ignore' });
  await execa('sync', [], { stdin: 'ignore' });
}

/** `fstrim -v MOUNTPOINT`: discards the filesystem's free space; returns the bytes the kernel reports trimmed. */
export async function fstrim(mountpoint: string): Promise<number> {
  const r = await execa('fstrim', ['-v', mountpoint], { stdin: 'ignore' });
  const m = /\(([0-9]+) bytes\) trimmed|([0-9]+) bytes were trimmed/.exec(String(r.stdout));
  if (!m) throw new BlocksnapError('E_DEVICE', `unexpected fstrim output: ${String(r.stdout)}`);
  return Number(m[1] ?? m[2]);
}
