/**
 * The kernel NBD client (nbd-client from the nbd-client package) as an
 * NbdAttacher, for hosts with /dev/nbd*. This host's kernel has no NBD
 * (LAB.md): test/lvm/nbd-kernel.test.ts runs it for real in a
 * user-mode-linux guest (the kit's nbd.ko, Debian's nbd-client 3.24, which
 * connects through netlink and exits) against the appliance's NBD server;
 * the command building and URI parsing are unit-tested. A free device is one whose sysfs `pid` is
 * absent and size is 0; the step is recorded before nbd-client runs, and
 * released with `nbd-client -d` while the device is still connected.
 */
import { readFile, readdir } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';
import type { AttachOptions, NbdAttacher } from './nbd-attacher.js';
import { NbdfuseAttacher } from './nbdfuse-attacher.js';
import type { MountJournal } from './mount-state.js';

export interface NbdUri {
  host: string;
  port: number;
  exportName: string;
  tls: boolean;
}

/** nbd://host[:port]/EXPORT (and nbds://), as libnbd takes it; IPv6 hosts in brackets. */
export function parseNbdUri(uri: string): NbdUri {
  let u: URL;
  try {
    u = new URL(uri);
  } catch (e) {
    throw new BlocksnapError('E_USAGE', `not an NBD URI: ${uri}`, { cause: e });
  }
  if (u.protocol !== 'nbd:' && u.protocol !== 'nbds:') throw new BlocksnapError('E_USAGE', `not an NBD URI (nbd:// or nbds://): ${uri}`);
  if (!u.hostname) throw new BlocksnapError('E_USAGE', `NBD URI without a host: ${uri}`);
  return {
    host: u.hostname.replace(/^\[(.*)\]$/, '$1'),
    port: u.port ? Number(u.port) : 10809,
    exportName: decodeURIComponent(u.pathname.replace(/^\//, '')),
    tls: u.protocol === 'nbds:',
  };
}

/** The nbd-client command line connecting `device` to the export (nbd-client ≥ 3.10 syntax). */
export function nbdClientArgs(uri: NbdUri, device: string, readOnly: boolean): string[] {
  if (uri.tls) throw new BlocksnapError('E_USAGE', 'the kernel NBD attach does not do TLS yet (nbds://); use nbdfuse');
  return [uri.host, String(uri.port), device, '-N', uri.exportName, '-block-size', '4096', ...(readOnly ? ['-readonly'] : [])];
}

export function nbdClientDetachArgs(device: string): string[] {
  return ['-d', device];
}

async function connected(device: string): Promise<boolean> {
  const base = `/sys/block/${path.basename(device)}`;
  const pid = await readFile(`${base}/pid`, 'utf8').then(() => true, () => false);
  const size = await readFile(`${base}/size`, 'utf8').then((s) => Number(s.trim()), () => 0);
  return pid || size > 0;
}

async function freeDevice(): Promise<string> {
  const names = (await readdir('/sys/block')).filter((n) => /^nbd\d+$/.test(n)).sort((a, b) => Number(a.slice(3)) - Number(b.slice(3)));
  for (const n of names) if (!(await connected(n))) return `/dev/${n}`;
  throw new BlocksnapError('E_BUSY', 'no free /dev/nbd device');
}

export async function releaseKernelNbd(device: string): Promise<'released' | 'absent'> {
  if (!(await connected(device))) return 'absent';
  const r = await execa('nbd-client', nbdClientDetachArgs(device), { reject: false, stdin: 'ignore', timeout: 30_000 });
  if (r.exitCode !== 0) throw new BlocksnapError('E_DEVICE', `nbd-client -d ${device} failed: ${String(r.stderr).trim()}`, { cause: r });
  return 'released';
}

export class KernelNbdAttacher implements NbdAttacher {
  readonly kind = 'nbd-client' as const;

  async attach(uri: string, o: AttachOptions, journal: MountJournal): Promise<string> {
    const parsed = parseNbdUri(uri);
    // nbd-client's TLS needs it to stay up as the kernel's TLS proxy (and its own CA
    // options); nbds:// goes through nbdfuse + nbdkit's TLS client instead, as on hosts without NBD.
    if (parsed.tls) return new NbdfuseAttacher().attach(uri, o, journal);
    const device = await freeDevice();
    const args = nbdClientArgs(parsed, device, o.readOnly);
    await journal.step({ kind: 'nbd-kernel', device });
    const r = await execa('nbd-client', args, { reject: false, stdin: 'ignore', timeout: 60_000 });
    // The export name is a capability: not in the message.
    if (r.exitCode !== 0) throw new BlocksnapError('E_DEVICE', `nbd-client ${parsed.host}:${parsed.port} ${device} failed: ${String(r.stderr).trim()}`);
    return device;
  }
}
