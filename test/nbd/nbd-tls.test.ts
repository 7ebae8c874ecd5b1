/**
 * NBD over TLS: NBD_OPT_STARTTLS with a self-signed certificate made here
 * with the openssl CLI, against libnbd's nbdinfo/nbdcopy (nbds:// with
 * tls-certificates=DIR holding ca-cert.pem), and a raw socket for what a
 * plaintext client gets before STARTTLS.
 */
import { execFile } from 'node:child_process';
import { connect } from 'node:net';
import { copyFile, mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { NbdServer, fixedExport } from '../../appliance/nbd/nbd-server.js';
import { ImageSource } from '../../appliance/nbd/image-source.js';
import { readOnlyExport } from '../../appliance/nbd/read-only-export.js';
import { encodeClientFlags, encodeExportRequest, encodeOption } from '../../appliance/nbd/nbd-codec.js';
import { Opt, Rep } from '../../appliance/nbd/nbd-layout.js';
import { MemoryChunkStore } from '../../appliance/testing/memory-chunk-store.js';
import { TempDirs } from '../../appliance/testing/store-fixtures.js';
import { storeRandomImage } from '../../appliance/testing/stored-image.js';

const run = promisify(execFile);
const CS = 4096;
const NAME = 'e2b7c4d1a0f9e8d7c6b5a4938271605f';
const dirs = new TempDirs();
const cleanups: Array<() => Promise<unknown>> = [];
let key: Buffer;
let cert: Buffer;
let caDir: string;
let volume: Buffer;
let source: ImageSource;

beforeAll(async () => {
  const dir = await dirs.make('blocksnap-nbd-tls-');
  await run('openssl', [
    'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
    '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'),
    '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1', '-addext', 'basicConstraints=critical,CA:TRUE',
  ], { timeout: 30_000 });
  key = await readFile(join(dir, 'key.pem'));
  cert = await readFile(join(dir, 'cert.pem'));
  // libnbd (GnuTLS) trusts what DIR/ca-cert.pem holds: the self-signed certificate itself.
  caDir = join(dir, 'ca');
  await mkdir(caDir);
  await copyFile(join(dir, 'cert.pem'), join(caDir, 'ca-cert.pem'));

  const store = new MemoryChunkStore();
  const image = await storeRandomImage(store, { size: 8 * CS, chunkSize: CS, zeroAt: () => false });
  volume = image.volume;
  const { rootDigest } = image;
  source = await ImageSource.open(store, rootDigest);
});
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => undefined);
});
afterAll(() => dirs.cleanup());

async function serveTls(): Promise<NbdServer> {
  const server = await NbdServer.start({ resolve: fixedExport(NAME, readOnlyExport(source)), tls: { key, cert } });
  cleanups.push(() => server.close());
  return server;
}

describe('NBD over TLS', () => {
  it('nbdinfo and nbdcopy over nbds:// with the certificate trusted: size and bytes right', async () => {
    const server = await serveTls();
    const uri = `${server.uri(NAME)}?tls-certificates=${caDir}`;
    expect(uri.startsWith('nbds://')).toBe(true);
    const { stdout } = await run('nbdinfo', ['--json', uri], { timeout: 20_000 });
    const ex = (JSON.parse(stdout) as { exports: Array<Record<string, unknown>> }).exports[0]!;
    expect(ex['export-size']).toBe(volume.length);
    expect(JSON.parse(stdout)).toMatchObject({ TLS: true });
    const out = join(await dirs.make('blocksnap-nbd-tls-out-'), 'out.raw');
    await run('nbdcopy', [uri, out], { timeout: 30_000 });
    expect((await readFile(out)).equals(volume)).toBe(true);
  });

  it('an untrusted certificate is refused by the client; a plaintext nbd:// client gets nothing', async () => {
    const server = await serveTls();
    // Another self-signed certificate as the only trusted CA.
    const other = await dirs.make('blocksnap-nbd-tls-other-');
    await run('openssl', [
      'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-keyout', join(other, 'key.pem'), '-out', join(other, 'ca-cert.pem'),
      '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1', '-addext', 'basicConstraints=critical,CA:TRUE',
    ], { timeout: 30_000 });
    await expect(run('nbdinfo', ['--size', `${server.uri(NAME)}?tls-certificates=${other}`], { timeout: 20_000 })).rejects.toMatchObject({
      stderr: expect.stringMatching(/certificate|verif/i),
    });
    const plain = `nbd://127.0.0.1:${server.port}/${NAME}`;
    await expect(run('nbdinfo', ['--size', plain], { timeout: 20_000 })).rejects.toMatchObject({ stderr: expect.stringMatching(/TLS|tls/) });
  });

  it('raw: GO/INFO/LIST before STARTTLS → ERR_TLS_REQD, EXPORT_NAME closes; without a certificate STARTTLS → ERR_UNSUP', async () => {
    const server = await serveTls();
    const talk = async (port: number, opts: Buffer[]): Promise<{ types: number[]; closed: boolean }> => {
      const s = connect(port, '127.0.0.1');
      cleanups.push(async () => s.destroy());
      let buf = Buffer.alloc(0);
      let closed = false;
      s.on('data', (b: Buffer) => { buf = Buffer.concat([buf, b]); });
      s.on('close', () => { closed = true; });
      s.on('error', () => undefined);
      s.write(Buffer.concat([encodeClientFlags(3), ...opts]));
      const types: number[] = [];
      const deadline = Date.now() + 10_000;
      let at = 18;
      while (Date.now() < deadline && !closed) {
        while (buf.length >= at + 20 && buf.length >= at + 20 + buf.readUInt32BE(at + 16)) {
          types.push(buf.readUInt32BE(at + 12));
          at += 20 + buf.readUInt32BE(at + 16);
        }
        if (types.length >= opts.length) break;
        await new Promise((r) => setTimeout(r, 10));
      }
      return { types, closed };
    };
    const r = await talk(server.port, [
      encodeOption(Opt.INFO, encodeExportRequest(NAME)),
      encodeOption(Opt.LIST),
      encodeOption(Opt.GO, encodeExportRequest(NAME)),
      encodeOption(Opt.STRUCTURED_REPLY),
    ]);
    expect(r.types).toEqual([Rep.ERR_TLS_REQD, Rep.ERR_TLS_REQD, Rep.ERR_TLS_REQD, Rep.ERR_TLS_REQD]);
    const e = await talk(server.port, [encodeOption(Opt.EXPORT_NAME, Buffer.from(NAME))]);
    const deadline = Date.now() + 10_000;
    while (!e.closed && Date.now() < deadline) await new Promise((res) => setTimeout(res, 10));
    expect(e.types).toEqual([]);

    const plainServer = await NbdServer.start({ resolve: fixedExport(NAME, readOnlyExport(source)) });
    cleanups.push(() => plainServer.close());
    expect((await talk(plainServer.port, [encodeOption(Opt.STARTTLS)])).types).toEqual([Rep.ERR_UNSUP]);
  });
});
