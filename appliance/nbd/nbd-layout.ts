/**
 * Constants of the NBD protocol (the NBD project's doc/proto.md), as the
 * appliance's server speaks it: fixed newstyle handshake, options, the
 * transmission phase's requests, simple and structured replies. Every number
 * on the wire is big-endian. Message layouts are documented in nbd-codec.ts.
 */

/** "NBDMAGIC": first 8 bytes the server sends. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": second 8 bytes of the greeting, and the start of every option. */
export const NBD_OPT_MAGIC = 0x49484156454f5054n;
/** Start of every option reply. */
export const NBD_REP_MAGIC = 0x0003e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server, u16). */
export const HandshakeFlag = Object.freeze({
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
});

/** Client flags (u32); any other bit set makes the server close. */
export const ClientFlag = Object.freeze({
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
});
export const KNOWN_CLIENT_FLAGS = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES;

/** Option codes (u32). */
export const Opt = Object.freeze({
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
});

const ERR = 0x80000000;
/** Option reply types (u32); bit 31 set = error. */
export const Rep = Object.freeze({
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: ERR + 1,
  ERR_POLICY: ERR + 2,
  ERR_INVALID: ERR + 3,
  ERR_PLATFORM: ERR + 4,
  ERR_TLS_REQD: ERR + 5,
  ERR_UNKNOWN: ERR + 6,
  ERR_SHUTDOWN: ERR + 7,
  ERR_BLOCK_SIZE_REQD: ERR + 8,
  ERR_TOO_BIG: ERR + 9,
});

/** NBD_REP_INFO item types (u16). */
export const Info = Object.freeze({
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
});

/** Transmission flags (u16), sent with the export's size. */
export const TransmitFlag = Object.freeze({
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
});

/** Request types (u16). */
export const Cmd = Object.freeze({
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
});

/** Request flags (u16). */
export const CmdFlag = Object.freeze({
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
});

/** Structured reply chunk flags (u16). */
export const ReplyFlag = Object.freeze({ DONE: 1 << 0 });

/** Structured reply chunk types (u16); bit 15 set = error. */
export const ReplyType = Object.freeze({
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
});

/** The one metadata context served, and its status bits (proto.md, "base:allocation"). */
export const BASE_ALLOCATION = 'base:allocation';
export const State = Object.freeze({ HOLE: 1 << 0, ZERO: 1 << 1 });

/** Error values on the wire (Linux errno numbers, fixed by the protocol). */
export const NbdErrno = Object.freeze({
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
});

/** Fixed sizes of headers (bytes). */
export const GREETING_BYTES = 18;
export const CLIENT_FLAGS_BYTES = 4;
export const OPTION_HEADER_BYTES = 16;
export const OPTION_REPLY_HEADER_BYTES = 20;
export const REQUEST_HEADER_BYTES = 28;
export const SIMPLE_REPLY_HEADER_BYTES = 16;
export const STRUCTURED_REPLY_HEADER_BYTES = 20;
/** Zero padding after NBD_OPT_EXPORT_NAME's reply unless NO_ZEROES was agreed. */
export const EXPORT_NAME_PADDING = 124;

/** Limits the decoder enforces (a peer past them is cut off with E_PROTOCOL). */
export const MAX_OPTION_DATA = 64 * 1024;
/** Largest WRITE payload accepted; also the maximum block size advertised. */
export const MAX_PAYLOAD = 32 * 1024 * 1024;
/** Strings (export names, messages) are at most 4096 bytes (proto.md, Conventions). */
export const MAX_STRING = 4096;
