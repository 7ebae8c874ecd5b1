/**
 * BlockDevice over a regular file (a reflink snapshot, an image) or a block
 * device node (a loop device, an LV), read with positional reads so several
 * reads may be in flight at once.
 */
import { readFile, open, type FileHandle } from 'node:fs/promises';
import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';
import type { BlockDevice } from './block-device.js';

/** Linux dev_t → major:minor (glibc encoding; rdev can exceed 32 bits). */
function majorMinor(rdev: number): [number, number] {
  const dev = BigInt(rdev);
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  return [Number(major), Number(minor)];
}

/** Size in bytes of a block device: sysfs counts 512-byte sectors whatever the logical sector size. */
async function blockDeviceSize(devicePath: string, rdev: number): Promise<number> {
  const [major, minor] = majorMinor(rdev);
  try {
    const sectors = (await readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8')).trim();
    if (/^\d+$/.test(sectors)) return Number(sectors) * 512;
  } catch {
    // no sysfs (container without /sys): ask the kernel through blockdev(8)
  }
  const r = await execa('blockdev', ['--getsize64', devicePath], { reject: false, stdin: 'ignore' });
  const out = String(r.stdout).trim();
  if (r.exitCode !== 0 || !/^\d+$/.test(out)) {
    throw new BlocksnapError('E_DEVICE', `cannot get the size of ${devicePath}: ${String(r.stderr).trim()}`, { cause: r });
  }
  return Number(out);
}

/**
 * Largest single read: Node rejects lengths ≥ 2^31 and Linux caps one read
 * at 2 GiB - 4 KiB anyway, so bigger requests are assembled from several.
 */
export const MAX_READ_PER_CALL = 1 << 30;

export class FileBlockDevice implements BlockDevice {
  private handle: FileHandle | undefined;

  private constructor(
    readonly path: string,
    handle: FileHandle,
    readonly size: number,
    private readonly maxReadPerCall: number,
  ) {
    this.handle = handle;
  }

  /** `maxReadPerCall` bounds one read(2); a request above it is assembled from several. */
  static async open(path: string, opts: { maxReadPerCall?: number } = {}): Promise<FileBlockDevice> {
    const maxReadPerCall = opts.maxReadPerCall ?? MAX_READ_PER_CALL;
    if (!Number.isSafeInteger(maxReadPerCall) || maxReadPerCall < 1 || maxReadPerCall > MAX_READ_PER_CALL) {
      throw new BlocksnapError('E_DEVICE', `maxReadPerCall must be 1..${MAX_READ_PER_CALL}`);
    }
    let handle: FileHandle;
    try {
      handle = await open(path, 'r');
    } catch (e) {
      throw new BlocksnapError('E_DEVICE', `cannot open ${path}: ${(e as Error).message}`, { cause: e });
    }
    try {
      const st = await handle.stat();
      let size: number;
      if (st.isFile()) size = st.size;
      else if (st.isBlockDevice()) size = await blockDeviceSize(path, st.rdev);
      else throw new BlocksnapError('E_DEVICE', `${path} is neither a regular file nor a block device`);
      return new FileBlockDevice(path, handle, size, maxReadPerCall);
    } catch (e) {
      await handle.close().catch(() => undefined);
      if (e instanceof BlocksnapError) throw e;
      throw new BlocksnapError('E_DEVICE', `cannot stat ${path}`, { cause: e });
    }
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const handle = this.handle;
    if (!handle) throw new BlocksnapError('E_DEVICE', `${this.path} is closed`);
    if (!Number.isSafeInteger(offset) || offset < 0 || offset > this.size) {
      throw new BlocksnapError('E_DEVICE', `read offset ${offset} outside ${this.path} (size ${this.size})`);
    }
    if (!Number.isSafeInteger(length) || length < 0) {
      throw new BlocksnapError('E_DEVICE', `invalid read length ${length} on ${this.path}`);
    }
    const want = Math.min(length, this.size - offset);
    const buf = Buffer.allocUnsafe(want);
    let done = 0;
    while (done < want) {
      let n: number;
      try {
        ({ bytesRead: n } = await handle.read(buf, done, Math.min(want - done, this.maxReadPerCall), offset + done));
      } catch (e) {
        throw new BlocksnapError('E_DEVICE', `read of ${want - done} bytes at ${offset + done} on ${this.path} failed: ${(e as Error).message}`, {
          cause: e,
        });
      }
      // 0 before the end we measured at open: the file shrank under us.
      if (n === 0) {
        throw new BlocksnapError('E_DEVICE', `unexpected end of ${this.path} at ${offset + done} (size was ${this.size})`);
      }
      done += n;
    }
    return buf;
  }

  async close(): Promise<void> {
    const handle = this.handle;
    this.handle = undefined;
    await handle?.close();
  }
}
