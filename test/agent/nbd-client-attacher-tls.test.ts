/**
 * The kernel NBD attacher given an nbds:// export (agent/mount/nbd-client-attacher.ts):
 * on a host with /dev/nbd* (where defaultAttacher picks it) a TLS appliance's
 * mounts go through nbdfuse + nbdkit's TLS client instead of failing
 * ("the kernel NBD attach does not do TLS"). Run here on the host (no kernel
 * NBD needed for that path): a TLS NbdServer, the CA trusted, the device's
 * bytes equal the image, released from the journal record with nothing left.
 * It calls releaseSteps without a callback, which released nothing before
 * (`onReleased?.(s, await releaseStep(s))` skips its arguments when there is
 * no callback): a loop device and a FUSE mount were left, 3 runs of 3.
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KernelNbdAttacher } from '../../agent/mount/nbd-client-attacher.js';
import { MountJournal } from '../../agent/mount/mount-state.js';
import { releaseSteps } from '../../agent/mount/mount-steps.js';
import { readMountTable } from '../../agent/snapshot/fsfreeze.js';
import { ImageSource } from '../../appliance/nbd/image-source.js';
import { NbdServer, fixedExport } from '../../appliance/nbd/nbd-server.js';
import { readOnlyExport } from '../../appliance/nbd/read-only-export.js';
import { MemoryChunkStore } from '../../appliance/testing/memory-chunk-store.js';
import { TempDirs, sha256 } from '../../appliance/testing/store-fixtures.js';
import { storeRandomImage } from '../../appliance/testing/stored-image.js';

const run = promisify(execFile);
const CS = 65536;
const NAME = '7f3e9a2b4c6d8e0f1a3b5c7d9e1f2a4b';
const dirs = new TempDirs();
let volume: Buffer;
let server: NbdServer;
let caDir: string;

beforeAll(async () => {
  const dir = await dirs.make('bsn-kattach-tls-');
  await run('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2', '-subj', '/CN=127.0.0.1',
    '-addext', 'subjectAltName=IP:127.0.0.1', '-addext', 'basicConstraints=critical,CA:TRUE',
    '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'),
  ], { timeout: 30_000 });
  caDir = join(dir, 'ca');
  await mkdir(caDir);
  await writeFile(join(caDir, 'ca-cert.pem'), await readFile(join(dir, 'cert.pem')));
  const store = new MemoryChunkStore();
  const image = await storeRandomImage(store, { size: 8 * CS, chunkSize: CS, zeroAt: () => false });
  volume = image.volume;
  const { rootDigest } = image;
  const source = await ImageSource.open(store, rootDigest);
  server = await NbdServer.start({ resolve: fixedExport(NAME, readOnlyExport(source)), tls: { key: await readFile(join(dir, 'key.pem')), cert: await readFile(join(dir, 'cert.pem')) } });
});

afterAll(async () => {
  await server?.close();
  await dirs.cleanup();
});

describe('KernelNbdAttacher with nbds://', () => {
  it('attaches through nbdfuse with the CA (no "kernel NBD does not do TLS" failure): bytes equal the image, released leaving nothing', async () => {
    const stateDir = await dirs.make('bsn-kattach-state-');
    const workDir = await mkdtemp(join(stateDir, 'work-'));
    const journal = await MountJournal.create(stateDir, { mountId: 'kattach-tls', imageId: 'img', target: join(stateDir, 'none') });
    const uri = server.uri(NAME);
    expect(uri.startsWith('nbds://')).toBe(true);
    let device: string | undefined;
    try {
      device = await new KernelNbdAttacher().attach(uri, { workDir, name: 'pgdata', readOnly: true, tlsCertificates: caDir }, journal);
      expect(device).toMatch(/^\/dev\/loop\d+$/);
      expect(journal.state.steps.map((s) => s.kind)).toEqual(['dir', 'nbdfuse', 'loop']);
      const { stdout } = await run('sha256sum', [device]);
      expect(stdout.split(' ')[0]).toBe(sha256(volume).toString('hex'));
    } finally {
      await releaseSteps(journal.state.steps).finally(() => journal.remove());
    }
    const leftMounts = (await readMountTable()).filter((m) => m.mountPoint.startsWith(stateDir)).map((m) => m.mountPoint);
    const { stdout } = await run('losetup', ['--list', '--noheadings', '--output', 'NAME,BACK-FILE']);
    const leftLoops = stdout.split('\n').filter((l) => l.includes(stateDir)).map((l) => l.trim().split(/\s+/)[0]!);
    // A safety net, so a failing release cannot leave this machine a loop device or FUSE mount; the test still fails.
    for (const d of leftLoops) await run('losetup', ['--detach', d]).catch(() => undefined);
    for (const m of leftMounts) await run('fusermount3', ['-u', '-z', m]).catch(() => undefined);
    expect({ leftMounts, leftLoops }).toEqual({ leftMounts: [], leftLoops: [] });
  }, 60_000);
});
