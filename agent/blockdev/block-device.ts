/**
 * A readable block device or image file (a snapshot, a loop device, an LV).
 *
 * Contract:
 * - `size` is fixed for the lifetime of the object (bytes).
 * - `read(offset, length)` returns exactly `min(length, size - offset)` bytes
 *   and throws BlocksnapError(E_DEVICE) for offset < 0 or offset > size;
 *   short reads from the OS are retried, never returned.
 * - `close()` is idempotent; reads after close throw E_DEVICE.
 */
export interface BlockDevice {
  readonly path: string;
  readonly size: number;
  read(offset: number, length: number): Promise<Buffer>;
  close(): Promise<void>;
}
