import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  buildManifest,
  decodeManifest,
  encodeManifest,
  isValidImageId,
  listManifests,
  manifestPath,
  newImageId,
  readManifest,
  writeManifest,
  type Manifest,
  type ManifestFields,
} from '../../appliance/store/manifest.js';
import { expectDurableOrder, haveStrace, repoRoot, traceDurableWrite } from '../support/durable-write-trace.js';

const ROOT = 'ab'.repeat(32);

function fields(over: Partial<ManifestFields> = {}): ManifestFields {
  return {
    agent: 'db1', volume: 'pgdata', volumeSize: 4294967296, chunkSize: 65536,
    kind: 'full', basisImageId: null, jobId: 'job-1', rootDigest: ROOT,
    stats: { chunksStored: 2, bytesStored: 10 }, ...over,
  };
}

function expectCode(fn: () => unknown, code: string): void {
  expect(fn).toThrow(expect.objectContaining({ code }));
}

describe('image ids', () => {
  it('newImageId is img-<utc stamp lowercased>-<8 hex>, unique, and valid', () => {
    const id = newImageId(new Date('2024-05-06T07:08:09.010Z'));
    expect(id).toMatch(/^img-20240506t070809z-[0-9a-f]{8}$/);
    const ids = new Set(Array.from({ length: 1000 }, () => newImageId()));
    expect(ids.size).toBe(1000);
    for (const x of ids) expect(isValidImageId(x)).toBe(true);
  });

  it('isValidImageId refuses anything that could escape a path or is not ours', () => {
    for (const bad of ['', 'img-', 'img-../../etc/passwd', 'img-20240506t070809z-0a1b2c3d/x',
      'IMG-20240506T070809Z-0A1B2C3D', 'img-20240506t070809z-0a1b2c3d.json', 'img-20240506t070809z-0a1b2c3',
      ' img-20240506t070809z-0a1b2c3d', 'img-20240506t070809z-0a1b2c3d\n', 42, null, undefined]) {
      expect(isValidImageId(bad), String(bad)).toBe(false);
    }
    expectCode(() => manifestPath('/x', 'img-../../etc'), 'E_FORMAT');
  });
});

describe('manifest encoding', () => {
  it('pins the canonical JSON and its checksum', () => {
    const m = buildManifest(fields({ imageId: 'img-20240506t070809z-0a1b2c3d', createdAt: '2024-05-06T07:08:09.010Z' }));
    const canonical = '{"agent":"db1","basisImageId":null,"checksum":"","chunkSize":65536,' +
      '"createdAt":"2024-05-06T07:08:09.010Z","format":"blocksnap-manifest",' +
      '"imageId":"img-20240506t070809z-0a1b2c3d","jobId":"job-1","kind":"full",' +
      `"rootDigest":"${ROOT}","stats":{"bytesStored":10,"chunksStored":2},"version":1,` +
      '"volume":"pgdata","volumeSize":4294967296}';
    const checksum = createHash('sha256').update(canonical).digest('hex');
    expect(m.checksum).toBe(checksum);
    expect(encodeManifest(m).toString('utf8')).toBe(canonical.replace('"checksum":""', `"checksum":"${checksum}"`) + '\n');
    expect(decodeManifest(encodeManifest(m))).toEqual(m);
  });

  it('accepts a reformatted file (checksum is over the canonical form)', () => {
    const m = buildManifest(fields());
    expect(decodeManifest(JSON.stringify(m, null, 2))).toEqual(m);
  });

  it('detects tampering', () => {
    const m = buildManifest(fields());
    const tampered: Array<Partial<Manifest>> = [
      { volumeSize: 2 * 4294967296 }, { rootDigest: 'cd'.repeat(32) }, { stats: { chunksStored: 3, bytesStored: 10 } },
      { createdAt: '2030-01-01T00:00:00.000Z' }, { kind: 'incremental', basisImageId: newImageId() },
    ];
    for (const t of tampered) {
      expectCode(() => decodeManifest(JSON.stringify({ ...m, ...t })), 'E_STORE_CORRUPT');
    }
  });

  it('validates every field', () => {
    expectCode(() => buildManifest(fields({ kind: 'incremental' })), 'E_FORMAT');
    expectCode(() => buildManifest(fields({ basisImageId: newImageId() })), 'E_FORMAT');
    expectCode(() => buildManifest(fields({ kind: 'incremental', basisImageId: 'img-x' })), 'E_FORMAT');
    const self = newImageId();
    expectCode(() => buildManifest(fields({ imageId: self, kind: 'incremental', basisImageId: self })), 'E_FORMAT');
    expectCode(() => buildManifest(fields({ imageId: 'img-bad' })), 'E_FORMAT');
    expectCode(() => buildManifest(fields({ rootDigest: 'AB'.repeat(32) })), 'E_FORMAT');
    expectCode(() => buildManifest(fields({ chunkSize: 1000 })), 'E_FORMAT');
    expectCode(() => buildManifest(fields({ volumeSize: 0 })), 'E_FORMAT');
    expectCode(() => buildManifest(fields({ agent: '' })), 'E_FORMAT');
    expectCode(() => buildManifest(fields({ createdAt: 'yesterday' })), 'E_FORMAT');
    expectCode(() => buildManifest(fields({ stats: { x: Number.NaN } })), 'E_FORMAT');
    expectCode(() => buildManifest(fields({ stats: { x: 'one' as unknown as number } })), 'E_FORMAT');
    const incr = buildManifest(fields({ kind: 'incremental', basisImageId: newImageId() }));
    expect(incr.kind).toBe('incremental');
    const m = buildManifest(fields());
    expectCode(() => decodeManifest('{"format":'), 'E_FORMAT');
    expectCode(() => decodeManifest(JSON.stringify({ ...m, extra: 1 })), 'E_FORMAT');
    expectCode(() => decodeManifest(JSON.stringify({ ...m, version: 2 })), 'E_FORMAT');
    expectCode(() => decodeManifest(JSON.stringify([m])), 'E_FORMAT');
    expectCode(() => encodeManifest({ ...m, jobId: 'job-2' }), 'E_FORMAT');
  });
});

describe('manifest files', () => {
  let dir: string;
  let storeDir: string;
  beforeEach(async () => {
    dir = await mkdtemp(path.join(tmpdir(), 'bsn-manifest-'));
    storeDir = path.join(dir, 'store');
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('writes through store/tmp, leaves no temp, reads back verified', async () => {
    const m = buildManifest(fields());
    const file = await writeManifest(storeDir, m);
    expect(file).toBe(path.join(storeDir, 'manifests', `${m.imageId}.json`));
    expect(await readdir(path.join(storeDir, 'tmp'))).toEqual([]);
    expect(await readdir(path.join(storeDir, 'manifests'))).toEqual([`${m.imageId}.json`]);
    expect(await readFile(file)).toEqual(encodeManifest(m));
    expect(await readManifest(storeDir, m.imageId)).toEqual(m);
    expect(await listManifests(storeDir)).toEqual([m.imageId]);
  });

  it('never replaces a committed manifest', async () => {
    const m = buildManifest(fields());
    await writeManifest(storeDir, m);
    const other = buildManifest(fields({ imageId: m.imageId, jobId: 'job-2' }));
    await expect(writeManifest(storeDir, other)).rejects.toMatchObject({ code: 'E_STORE_IO' });
    expect(await readManifest(storeDir, m.imageId)).toEqual(m);
    expect(await readdir(path.join(storeDir, 'tmp'))).toEqual([]);
  });

  it('read: missing, bad id, tampered file, file holding another image', async () => {
    await expect(readManifest(storeDir, newImageId())).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
    await expect(readManifest(storeDir, '../x')).rejects.toMatchObject({ code: 'E_FORMAT' });
    const a = buildManifest(fields());
    const b = buildManifest(fields({ jobId: 'job-b' }));
    await writeManifest(storeDir, a);
    await writeManifest(storeDir, b);
    const fileA = manifestPath(storeDir, a.imageId);
    const text = await readFile(fileA, 'utf8');
    await writeFile(fileA, text.replace('"volumeSize":4294967296', '"volumeSize":4294967297'));
    await expect(readManifest(storeDir, a.imageId)).rejects.toMatchObject({ code: 'E_STORE_CORRUPT' });
    await writeFile(fileA, encodeManifest(b));
    await expect(readManifest(storeDir, a.imageId)).rejects.toMatchObject({ code: 'E_STORE_CORRUPT' });
  });

  it('lists only committed manifests: leftover temps and strays are ignored', async () => {
    expect(await listManifests(storeDir)).toEqual([]);
    const ids = [newImageId(new Date('2024-01-02T00:00:00Z')), newImageId(new Date('2023-12-31T23:59:59Z'))];
    for (const imageId of ids) await writeManifest(storeDir, buildManifest(fields({ imageId })));
    const leftover = buildManifest(fields());
    await writeFile(path.join(storeDir, 'tmp', `manifest-${leftover.imageId}-1-deadbeef.tmp`), encodeManifest(leftover));
    await writeFile(path.join(storeDir, 'manifests', `${leftover.imageId}.json.tmp`), encodeManifest(leftover));
    await writeFile(path.join(storeDir, 'manifests', 'notes.json'), '{}');
    await mkdir(path.join(storeDir, 'manifests', 'img-sub'));
    expect(await listManifests(storeDir)).toEqual([...ids].sort());
  });

  it.skipIf(!haveStrace)('syscalls: temp fsync, rename into manifests, then directory fsync', async () => {
    const m = buildManifest(fields());
    expectDurableOrder(traceDurableWrite(dir, `import { writeManifest } from ${JSON.stringify(path.join(repoRoot, 'appliance/store/manifest.js'))};
await writeManifest(${JSON.stringify(storeDir)}, ${JSON.stringify(m)});\n`,
    { target: path.join(storeDir, 'manifests', `${m.imageId}.json`), tmpMark: path.join(storeDir, 'tmp', `.${m.imageId}.json.`) }));
    expect(await readManifest(storeDir, m.imageId)).toEqual(m);
  });
});
