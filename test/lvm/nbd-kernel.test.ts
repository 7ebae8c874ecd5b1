/**
 * The agent's kernel NBD attach (agent/mount/nbd-client-attacher.ts) for
 * real: this host's kernel has no NBD, the user-mode-linux guest's has
 * (the kit's nbd.ko). The appliance's NbdServer runs in this process on
 * 127.0.0.1 (10.0.2.2 from the guest) serving an image of a real chunk
 * store, read-only and writable (copy-on-write overlay); Debian's
 * nbd-client (downloaded and unpacked here, never installed) runs in the
 * guest under the compiled agent code (test/lvm/guest/nbd-kernel-attach.mjs).
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, readdir, rename, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FsChunkStore } from '../../appliance/store/fs-chunk-store.js';
import { ImageSource } from '../../appliance/nbd/image-source.js';
import { CowOverlay } from '../../appliance/nbd/cow-overlay.js';
import { NbdServer } from '../../appliance/nbd/nbd-server.js';
import { readOnlyExport } from '../../appliance/nbd/read-only-export.js';
import { writableExport } from '../../appliance/nbd/writable-export.js';
import type { NbdExport } from '../../appliance/nbd/nbd-export.js';
import { TempDirs } from '../../appliance/testing/store-fixtures.js';
import { storeRandomImage } from '../../appliance/testing/stored-image.js';
import { repoRoot } from '../../scripts/lab/processes.js';
import { ensureUmlKit } from '../../scripts/lab/uml-kit.js';
import { waitFor } from '../support/wait-for.js';
import { explain, labSkipReason, runGuestScript } from './guest-runner.js';

const CS = 65536;
const CHUNKS = 64;
/** A multiple of 4096 (the kernel device's block size) that is not one of the chunk size: a short last chunk. */
const SIZE = CHUNKS * CS - 8192;
const WRITE_AT = 3 * CS + 1000;
const NBD_CLIENT_DIR = process.env.BLOCKSNAP_NBD_CLIENT_KIT ?? '/var/cache/blocksnap-nbd-client';
const PACKAGES = ['nbd-client', 'libnl-3-200', 'libnl-genl-3-200'];

/** Debian's nbd-client and the libnl it links, unpacked (dpkg -x) once into a cache; the guest runs it through hostfs. */
async function nbdClientKit(): Promise<string> {
  const root = path.join(NBD_CLIENT_DIR, 'root');
  if (existsSync(path.join(root, '.ready'))) return root;
  const debs = path.join(NBD_CLIENT_DIR, 'debs');
  await mkdir(debs, { recursive: true });
  const have = await readdir(debs);
  const missing = PACKAGES.filter((p) => !have.some((f) => f.startsWith(`${p}_`)));
  if (missing.length) await execa('apt-get', ['download', ...missing], { cwd: debs, stdin: 'ignore' });
  const tmp = `${root}.tmp-${process.pid}`;
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp, { recursive: true });
  for (const f of (await readdir(debs)).filter((n) => n.endsWith('.deb'))) await execa('dpkg', ['-x', path.join(debs, f), tmp], { stdin: 'ignore' });
  await rm(root, { recursive: true, force: true });
  await rename(tmp, root);
  await writeFile(path.join(root, '.ready'), new Date().toISOString());
  return root;
}

const kitSkip: string | null = labSkipReason ?? await nbdClientKit().then(() => null, (e: Error) => `cannot fetch nbd-client (${e.message.split('\n')[0]})`);
if (kitSkip && !labSkipReason) console.warn(`kernel NBD test skipped: ${kitSkip}`);

const dirs = new TempDirs();
let store: FsChunkStore;
let rootDigest: Buffer;
let volume: Buffer;

beforeAll(async () => {
  if (kitSkip) return;
  store = await FsChunkStore.open(await dirs.make('blocksnap-nbdk-store-'));
  ({ rootDigest, volume } = await storeRandomImage(store, { size: SIZE, chunkSize: CS, zeroAt: (i) => i % 5 === 2 }));
});

afterAll(async () => {
  await store?.close();
  await dirs.cleanup();
});

/** An export's bytes in [offset, offset + length) (holes as zeros). */
async function bytesOf(e: NbdExport, offset: number, length: number): Promise<Buffer> {
  return Buffer.concat((await e.read(offset, length)).map((g) => ('data' in g ? g.data : Buffer.alloc(g.hole))));
}

interface Round {
  kind: string; device: string; error?: string; releaseError?: string; recorded: Array<{ kind: string; device: string }>;
  attached: { pid: string | null; size: number; ro: string | null }; released: { pid: string | null; size: number };
  release: string[]; releaseAgain: string[]; sha256?: string; writeRefused?: string | null; readBackEqual?: boolean; attachSeconds: number;
}

describe.skipIf(kitSkip)('kernel NBD attach (nbd-client) in a user-mode-linux guest', () => {
  it('nbd-client connects /dev/nbd0 to the appliance export on the host: reads equal the image, a write reaches the overlay, detach frees the device and the connection', async () => {
    expect(existsSync(path.join(repoRoot(), 'dist/agent/mount/nbd-client-attacher.js')), 'run npm run build').toBe(true);
    const kit = await ensureUmlKit();
    const nbdc = await nbdClientKit();
    const source = await ImageSource.open(store, rootDigest);
    const overlay = await CowOverlay.create(path.join(await dirs.make('blocksnap-nbdk-ov-'), 'ov'), { volumeSize: SIZE, chunkSize: CS, rootDigest });
    // Connections the server holds: resolves minus releases (nbd-export.ts's contract).
    let live = 0;
    const counted = (e: NbdExport): NbdExport => ({ ...e, release: () => { live--; } });
    const ro = readOnlyExport(source);
    const rw = writableExport(source, overlay);
    const names: Record<string, NbdExport> = { ['a'.repeat(32)]: ro, ['b'.repeat(32)]: rw };
    const peers: string[] = [];
    const server = await NbdServer.start({
      resolve: async (name, peer) => {
        const e = names[name];
        if (!e) return undefined;
        live++;
        peers.push(peer.address);
        return counted(e);
      },
    });
    const out = await mkdtemp(path.join(os.tmpdir(), 'bsn-nbdk-out-'));
    try {
      const guestUri = (n: string) => server.uri(n).replace('127.0.0.1', '10.0.2.2');
      const env = {
        BSN_DIST: path.join(repoRoot(), 'dist'), BSN_OUT: out, BSN_SIZE: String(SIZE), BSN_WRITE_AT: String(WRITE_AT),
        BSN_RO_URI: guestUri('a'.repeat(32)), BSN_RW_URI: guestUri('b'.repeat(32)),
      };
      const script = `set -e
insmod /lib/modules/${kit.version}/kernel/drivers/block/nbd.ko nbds_max=4
export PATH=${nbdc}/sbin:${nbdc}/usr/sbin:$PATH LD_LIBRARY_PATH=${nbdc}/lib/x86_64-linux-gnu:${nbdc}/usr/lib/x86_64-linux-gnu
nbd-client -V 2>&1 | head -1
ls -l /dev/nbd0
node ${repoRoot()}/test/lvm/guest/nbd-kernel-attach.mjs
`;
      const r = await runGuestScript(script, { network: true, env, shared: [out], disksMiB: [], timeoutMs: 90_000 });
      const result = JSON.parse(await readFile(path.join(out, 'result.json'), 'utf8').catch(() => '{}')) as { done?: boolean; ro: Round; rw: Round; rw2: Round };
      const why = `${explain(r)}\n--- result ---\n${JSON.stringify(result, null, 2)}`;
      expect(r.code, why).toBe(0);
      expect(result.done, why).toBe(true);
      console.log(`kernel NBD in the guest: attach ${result.ro.attachSeconds.toFixed(2)} s (ro), ${result.rw.attachSeconds.toFixed(2)} s (rw); guest run ${r.seconds.toFixed(1)} s`);

      // Read-only: the kernel client, a device of the image's size, every byte the image's, writes refused.
      const { ro: a, rw: w, rw2: b } = result;
      for (const x of [a, w, b]) {
        expect(x.error, why).toBeUndefined();
        expect(x.kind).toBe('nbd-client');
        expect(x.device).toBe('/dev/nbd0');
        expect(x.recorded).toEqual([{ kind: 'nbd-kernel', device: '/dev/nbd0' }]);
        expect(x.attached.size).toBe(SIZE);
        expect(x.attached.pid, 'the kernel device is connected').toMatch(/^\d+$/);
        // Detach released the device: no client pid, size 0; releasing the record again finds nothing.
        expect(x.releaseError, why).toBeUndefined();
        expect(x.release).toEqual(['released']);
        expect(x.released.pid).toBeNull();
        expect(x.released.size).toBe(0);
        expect(x.releaseAgain).toEqual(['absent']);
      }
      expect(a.attached.ro).toBe('1');
      expect(a.sha256).toBe(createHash('sha256').update(volume).digest('hex'));
      expect(a.writeRefused, 'a write to the read-only device must fail').toMatch(/^E(PERM|ROFS|ACCES|IO)$/);

      // Writable: the write reached the appliance's overlay (read back after a new attach, and here through the export).
      expect(w.attached.ro).toBe('0');
      expect(b.readBackEqual).toBe(true);
      const pattern = Buffer.alloc(65536);
      for (let i = 0; i < pattern.length; i++) pattern[i] = (i * 7 + 3) & 0xff;
      const expected = Buffer.from(volume);
      pattern.copy(expected, WRITE_AT);
      expect(b.sha256).toBe(createHash('sha256').update(expected).digest('hex'));
      expect((await bytesOf(rw, WRITE_AT, pattern.length)).equals(pattern)).toBe(true);
      // The image itself is untouched.
      expect((await bytesOf(ro, 0, SIZE)).equals(volume)).toBe(true);

      // Every connection the guest opened was from the host's slirp (127.0.0.1) and has ended.
      expect(peers.length).toBeGreaterThanOrEqual(3);
      expect(new Set(peers)).toEqual(new Set(['127.0.0.1']));
      await waitFor('the server to release every connection', () => live === 0, { timeoutMs: 20_000 });
    } finally {
      await server.close();
      await overlay.close();
      await rm(out, { recursive: true, force: true });
    }
  }, 150_000);
});
