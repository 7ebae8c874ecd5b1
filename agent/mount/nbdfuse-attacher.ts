/**
 * NBD attach without the kernel's NBD module (LAB.md "Instant mount without
 * kernel NBD"): `nbdfuse DIR URI` exposes the export as the file DIR/nbd in
 * a FUSE mount, `losetup` makes that file a block device.
 *
 * nbdfuse runs in the foreground until its FUSE mount is unmounted; it is
 * started in a session of its own (setsid: a SIGHUP or the agent's death
 * does not take it down mid-I/O under a mounted filesystem), with its output
 * in a log file rather than a pipe to us (a dead reader would SIGPIPE it).
 * Ready = it wrote its pid file (-P). It is released by `fusermount3 -u DIR`
 * (then it exits by itself), never killed first.
 *
 * The loop device: `--direct-io=off` by default. With direct I/O the loop
 * device would use the FUSE file with O_DIRECT (no double caching); measured
 * in scripts/bench-mount.ts (BENCH_AB=directIo, alternating pairs) it made no
 * difference to mount-to-first-query, so the simpler buffered mode stays.
 */
import { spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { mkdir, readFile, realpath } from 'node:fs/promises';
import path from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import { processStartTime } from '../../proto/shared/proc.js';
import { attachLoopDevice } from './loop-device.js';
import type { AttachOptions, NbdAttacher } from './nbd-attacher.js';
import type { MountJournal } from './mount-state.js';

export interface NbdfuseOptions {
  directIo?: boolean;
  /** How long nbdfuse may take to connect and mount. */
  readyTimeoutMs?: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export function nbdfuseArgs(dir: string, uri: string, pidFile: string, readOnly: boolean, tlsCertificates?: string): string[] {
  if (!tlsCertificates) return ['-P', pidFile, ...(readOnly ? ['-r'] : []), dir, uri];
  // nbdfuse refuses tls-certificates=DIR in a URI (libnbd's allow_local_file, no
  // option of nbdfuse's): the TLS client is then nbdkit's nbd plugin, serving
  // nbdfuse over stdin/stdout (-s) and exiting with it.
  const u = new URL(uri);
  return ['-P', pidFile, ...(readOnly ? ['-r'] : []), dir, '--command', 'nbdkit', '-s', '--exit-with-parent', ...(readOnly ? ['-r'] : []),
    'nbd', `hostname=${u.hostname.replace(/^\[(.*)\]$/, '$1')}`, `port=${u.port}`, `export=${decodeURIComponent(u.pathname.slice(1))}`,
    'tls=require', `tls-certificates=${tlsCertificates}`];
}

export class NbdfuseAttacher implements NbdAttacher {
  readonly kind = 'nbdfuse' as const;
  constructor(private readonly o: NbdfuseOptions = {}) {}

  async attach(uri: string, o: AttachOptions, journal: MountJournal): Promise<string> {
    const dir = path.join(o.workDir, `nbd-${o.name}`);
    const pidFile = path.join(o.workDir, `nbdfuse-${o.name}.pid`);
    const logFile = path.join(o.workDir, `nbdfuse-${o.name}.log`);
    await journal.step({ kind: 'dir', path: dir });
    await mkdir(dir, { mode: 0o700 });
    const file = path.join(await realpath(dir), 'nbd');

    const done = await journal.step({ kind: 'nbdfuse', dir, file });
    const log = openSync(logFile, 'w', 0o600);
    let exited: number | null | undefined;
    let child;
    try {
      child = spawn('nbdfuse', nbdfuseArgs(dir, uri, pidFile, o.readOnly, o.tlsCertificates), { detached: true, stdio: ['ignore', log, log] });
    } finally {
      closeSync(log);
    }
    const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
    child.once('exit', (code) => { exited = code; });
    child.unref();
    if (child.pid === undefined) throw new BlocksnapError('E_DEVICE', 'cannot start nbdfuse', { cause: await spawnError });
    await done({ pid: child.pid, startTime: await processStartTime(child.pid) });

    const end = Date.now() + (this.o.readyTimeoutMs ?? 30_000);
    for (;;) {
      const pid = await readFile(pidFile, 'utf8').then((t) => t.trim(), () => '');
      if (/^\d+$/.test(pid)) break;
      if (exited !== undefined) {
        // The export name is a capability: the message names the file, not the URI.
        const why = (await readFile(logFile, 'utf8').catch(() => '')).trim().split('\n').slice(-3).join(' | ');
        throw new BlocksnapError('E_DEVICE', `nbdfuse exited (${exited}) before serving ${o.name}: ${why}`);
      }
      if (Date.now() > end) throw new BlocksnapError('E_TIMEOUT', `nbdfuse did not serve ${o.name} within ${this.o.readyTimeoutMs ?? 30_000} ms`);
      await sleep(5);
    }

    const loopDone = await journal.step({ kind: 'loop', backingFile: file });
    const device = await attachLoopDevice(file, { readOnly: o.readOnly, directIo: this.o.directIo ?? false });
    await loopDone({ device });
    return device;
  }
}
