/**
 * TLS mounts that must fail (issue 9, NBD_OPT_STARTTLS): the appliance
 * (in process, on a data dir holding one committed image) serves wss:// and
 * NBD with certificate A. The agent's mounter (agent/mount/nbd-local-mounter.ts,
 * the real nbdfuse + nbdkit-nbd-plugin TLS client) is given
 *   - CA B (another self-signed certificate) for an nbds:// grant: the
 *     handshake's certificate check fails → the mount fails with E_DEVICE
 *     naming the certificate problem;
 *   - a plaintext nbd:// grant of a TLS-only export: refused (the server
 *     answers NBD_REP_ERR_TLS_REQD, which libnbd reports as "Operation not
 *     supported"; its debug log carries the server's "TLS required").
 * Each time nothing is left behind (no state file, work dir, FUSE mount, loop
 * device or nbdfuse/nbdkit process), and the appliance keeps serving: a client
 * trusting A reads the export, during and after, byte-equal to the image.
 */
import { execFile } from 'node:child_process';
import { copyFile, mkdir, readFile, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdLocalMounter } from '../../agent/mount/nbd-local-mounter.js';
import type { MountGrant } from '../../agent/mount/mount-port.js';
import { readMountTable } from '../../agent/snapshot/fsfreeze.js';
import { StoreRig, rigVolume, type RigVolume } from '../../appliance/retention/store-rig.js';
import { TempDirs } from '../../appliance/testing/store-fixtures.js';
import type { MountRow } from '../../appliance/mounts/mount-catalog.js';
import { startAppliance, type ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { codeOf } from '../support/error-code.js';

const run = promisify(execFile);
const CS = 65536;
const SIZE = 32 * CS;

const dirs = new TempDirs();
let appl: ApplianceHarness;
let vol: RigVolume;
let imageId: string;
/** DIR/ca-cert.pem = certificate A (what libnbd clients trusting the appliance use). */
let caA: string;
let certB: Buffer;
let stateDir: string;
let runBase: string;

async function selfSigned(dir: string, cn: string): Promise<{ key: Buffer; cert: Buffer; certFile: string }> {
  await mkdir(dir, { recursive: true });
  await run('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2',
    '-subj', `/CN=${cn}`, '-addext', 'subjectAltName=IP:127.0.0.1', '-addext', 'basicConstraints=critical,CA:TRUE',
    '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'),
  ], { timeout: 30_000 });
  return { key: await readFile(join(dir, 'key.pem')), cert: await readFile(join(dir, 'cert.pem')), certFile: join(dir, 'cert.pem') };
}

beforeAll(async () => {
  const root = await dirs.make('bsn-mount-tls-bad-');
  const a = await selfSigned(join(root, 'a'), 'blocksnap-appliance-a');
  certB = (await selfSigned(join(root, 'b'), 'blocksnap-other-ca-b')).cert;
  caA = join(root, 'trust-a');
  await mkdir(caA);
  await copyFile(a.certFile, join(caA, 'ca-cert.pem'));
  const dataDir = join(root, 'appliance');
  const rig = await StoreRig.open(dataDir);
  vol = rigVolume('pgdata', SIZE, CS, [3]);
  imageId = (await rig.commit(vol)).imageId;
  await rig.close();
  appl = await startAppliance(['db1'], { dataDir, tls: { key: a.key, cert: a.cert } });
  expect(appl.url).toMatch(/^wss:/);
  stateDir = join(root, 'agent-state');
  runBase = join(root, 'run');
}, 120_000);

afterAll(async () => {
  await appl?.close();
  await dirs.cleanup();
});

function newMount(): Promise<MountRow> {
  return appl.app.mounts.create({ imageRef: imageId, agent: appl.app.catalog.agent('db1')!, peerAddress: '127.0.0.1', writable: true, ttlSeconds: 0, requestedBy: 'agent' });
}

function grantOf(row: MountRow, scheme: 'nbd' | 'nbds'): MountGrant {
  const x = row.exports[0]!;
  return {
    mountId: row.id, imageId, writable: true,
    exports: [{ volume: 'pgdata', imageId, uri: `${scheme}://127.0.0.1:${appl.app.nbdPort}/${x.exportName}`, size: SIZE, chunkSize: CS }],
  };
}

/** Processes whose command line names `marker` (the export name is on nbdfuse's and nbdkit's). */
async function processesNaming(marker: string): Promise<string[]> {
  const out: string[] = [];
  for (const pid of (await readdir('/proc')).filter((p) => /^\d+$/.test(p))) {
    const cmd = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (cmd.includes(marker)) out.push(`${pid}: ${cmd.replace(/\0/g, ' ')}`);
  }
  return out;
}

/** What a failed mount may have left: its state file and work dir, a mount under the state or run dir, a loop device on a FUSE file there, a client process. */
async function leftovers(exportName: string): Promise<string[]> {
  const left: string[] = [];
  left.push(...(await readdir(join(stateDir, 'mounts')).catch(() => [] as string[])).map((f) => `state ${f}`));
  left.push(...(await readdir(runBase).catch(() => [] as string[])).map((f) => `run dir ${f}`));
  left.push(...(await readMountTable()).filter((m) => m.mountPoint.startsWith(stateDir) || m.mountPoint.startsWith(runBase)).map((m) => `mount ${m.mountPoint}`));
  const { stdout } = await run('losetup', ['--list', '--noheadings', '--output', 'NAME,BACK-FILE']);
  left.push(...stdout.split('\n').filter((l) => l.includes(stateDir)).map((l) => `loop ${l.trim()}`));
  left.push(...(await processesNaming(exportName)).map((p) => `process ${p}`));
  return left;
}

/** A libnbd client trusting A: the whole export, byte-equal to the image. */
async function readsTheImage(row: MountRow): Promise<boolean> {
  const uri = `nbds://127.0.0.1:${appl.app.nbdPort}/${row.exports[0]!.exportName}?tls-certificates=${caA}`;
  const out = join(await dirs.make('bsn-tls-copy-'), 'copy.raw');
  await run('nbdcopy', [uri, out], { timeout: 60_000 });
  return (await readFile(out)).equals(vol.data);
}

describe('TLS mounts refused', () => {
  it('a mounter trusting the wrong CA: the mount fails naming the certificate, leaves nothing, and the appliance keeps serving', async () => {
    const other = await newMount();
    const bad = await newMount();
    let during: Promise<boolean> | undefined;
    try {
      const mounter = new NbdLocalMounter({ stateDir, runBase, ca: certB });
      during = readsTheImage(other); // another client, served while the bad one fails
      const mounting = mounter.mount(grantOf(bad, 'nbds'), async () => Buffer.alloc(0));
      const err = await mounting.then(() => null, (e: unknown) => e);
      expect(await codeOf(mounting)).toBe('E_DEVICE');
      // nbdkit's nbd plugin reports GnuTLS's verdict on the appliance's certificate.
      expect(String((err as Error).message)).toMatch(/nbdfuse exited \(\d+\) before serving pgdata: .*gnutls_handshake: Error in the certificate verification/);
      console.log(`wrong CA: ${(err as Error).message}`);
      expect(await leftovers(bad.exports[0]!.exportName)).toEqual([]);
      expect(await during).toBe(true);
      expect(await readsTheImage(other)).toBe(true);
      expect(appl.app.mounts.connectionsOf(bad.id)).toBe(0);
    } finally {
      await during?.catch(() => undefined);
      await appl.app.mounts.remove(bad.id, 'test');
      await appl.app.mounts.remove(other.id, 'test');
    }
  }, 90_000);

  it('a plaintext client of the TLS-only export is refused: nbdinfo and the mounter (nbd://) fail, nothing is left, others are served', async () => {
    const other = await newMount();
    const bad = await newMount();
    try {
      const plain = `nbd://127.0.0.1:${appl.app.nbdPort}/${bad.exports[0]!.exportName}`;
      // libnbd reports NBD_REP_ERR_TLS_REQD as "Operation not supported"; its debug log shows the server's reason.
      const info = await run('nbdinfo', [plain], { timeout: 30_000, env: { ...process.env, LIBNBD_DEBUG: '1' } }).then(() => null, (e: { stderr?: string }) => e);
      expect(info, 'nbdinfo without TLS must fail').not.toBeNull();
      expect(String(info!.stderr)).toMatch(/server error message: TLS required/);

      const mounter = new NbdLocalMounter({ stateDir, runBase, ca: certB });
      const mounting = mounter.mount(grantOf(bad, 'nbd'), async () => Buffer.alloc(0));
      const err = await mounting.then(() => null, (e: unknown) => e);
      expect(await codeOf(mounting)).toBe('E_DEVICE');
      expect(String((err as Error).message)).toMatch(/nbdfuse exited \(\d+\) before serving pgdata: .*server requires TLS/);
      console.log(`plaintext: ${(err as Error).message}`);
      expect(await leftovers(bad.exports[0]!.exportName)).toEqual([]);
      expect(await readsTheImage(other)).toBe(true);
    } finally {
      await appl.app.mounts.remove(bad.id, 'test');
      await appl.app.mounts.remove(other.id, 'test');
    }
  }, 90_000);
});
