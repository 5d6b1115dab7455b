"""The records workers send each other through the rings: their layouts, packed and read.

Every record starts with its kind (one byte); fixed fields follow
(little-endian), then the variable parts (an id, message bytes).  Who sends
what, and why, is in ``routing``; this module only knows the bytes.  It
never keeps state and never allocates beyond the record it builds.

    PUB     any worker -> home    store a message, deliver it, maybe ACK back
    ACK     home -> publisher     how many of a request's messages it stored (one per turn),
                                  and a single publish's subscribers when stored
    SUB     any worker -> home    register the worker, answer with MSGS (backlog)
    MSGS    home -> subscriber    the backlog newer than a SUB's cursor, with the id's
                                  last seq and epoch, maybe in parts
    CPOLL   any worker -> home    take (or look at) the compat cursor's next message
    CMSG    home -> subscriber    CPOLL's answer
    CGIVE   any worker -> home    give back a message taken for compat polls that had left
    CWAKE   home -> holders       compat polls: a message was given back, CPOLL again
    UNSUB   any worker -> home    the worker holds nobody (or no compat poll) for the id now
    RESET   restarted  -> home    forget every registration of the sender; recount
    DELIVER home -> subscribers   one new message for every holder of the id
    COUNT   any worker -> home    how the number of connections the sender holds changed
                                  for some ids (one record per tick), or, answering a
                                  RECOUNT, how many it holds for each (in parts)
    RECOUNT home -> every worker  the home zeroed its counts: report all you hold of mine
"""

import struct

PUB, ACK, SUB, MSGS, DELIVER, UNSUB, CPOLL, CMSG, RESET, CGIVE, CWAKE = b"PASMDUCcRGW"
COUNT, RECOUNT = b"Kk"

_PUB = struct.Struct("<BIIIB")        # kind, fd, serial, line, id length | id, data
_ACK = struct.Struct("<BIIIIQI")      # kind, fd, serial, stored, last seq, subscribers, refused | lines
_LINE = struct.Struct("<I")
_SUB = struct.Struct("<BIIIQBB")      # kind, fd, serial, since, epoch, flags, id length | id
_MSGS = struct.Struct("<BIIIQBB")     # kind, fd, serial, last, epoch, flags, id length | id, (seq, len, data)*
_MSG = struct.Struct("<II")
_DELIVER = struct.Struct("<BIQBB")    # kind, seq, epoch, flags, id length | id, data
_UNSUB = struct.Struct("<BBB")        # kind, which (UNSUB_*), id length | id
_CPOLL = struct.Struct("<BIIBB")      # kind, fd, serial, peek, id length | id
_CMSG = struct.Struct("<BIIIBB")      # kind, fd, serial, seq (0 = none), taken, id length | id, data
_CGIVE = struct.Struct("<BIB")        # kind, seq, id length | id
_CWAKE = struct.Struct("<BB")         # kind, id length | id
_COUNT = struct.Struct("<BBI")        # kind, flags, generation | (change, id length, id)*
_COUNT_ENTRY = struct.Struct("<iB")   # a change of holders (or holders: COUNT_FULL), id length
_RECOUNT = struct.Struct("<BI")       # kind, generation

ACK_REFUSED_MAX = 4096                # refused line numbers per ACK record
MSGS_FINAL, MSGS_REFUSED, MSGS_RESET = 1, 2, 4   # RESET: the SUB's cursor counted as 0
MSGS_HEADER = _MSGS.size
MSG_HEADER = _MSG.size
SUB_QUIET = 1                         # answer only with news (or a refusal)
UNSUB_ALL, UNSUB_COMPAT = 0, 1
DELIVER_COMPAT = 1                    # the compat cursor moved for this worker's compat polls
RESET_RECORD = bytes((RESET,))
COUNT_FULL, COUNT_FINAL = 1, 2        # an answer to RECOUNT (its generation); its last part
COUNT_HEADER = _COUNT.size


def pub(fd, serial, line, ident, data):
    return _PUB.pack(PUB, fd, serial, line, len(ident)) + ident + data


def read_pub(record):
    """(fd, serial, line, id, data)"""
    _, fd, serial, line, n = _PUB.unpack_from(record)
    start = _PUB.size
    return fd, serial, line, record[start:start + n], record[start + n:]


def ack(fd, serial, stored, last, refused_lines, subscribers=0):
    """``subscribers``: a single publish's (line 0) id's subscriber count when it was
    stored; 0 for a batch's messages (their answer does not say it)."""
    return (_ACK.pack(ACK, fd, serial, stored, last, subscribers, len(refused_lines))
            + b"".join(_LINE.pack(line) for line in refused_lines))


def read_ack(record):
    """(fd, serial, stored, last seq, [refused line numbers])"""
    _, fd, serial, stored, last, _subscribers, refused = _ACK.unpack_from(record)
    lines = [_LINE.unpack_from(record, _ACK.size + 4 * i)[0] for i in range(refused)]
    return fd, serial, stored, last, lines


def ack_subscribers(record):
    """An ACK's subscribers (see ``ack``)."""
    return _ACK.unpack_from(record)[5]


def sub(fd, serial, since, epoch, flags, ident):
    """Ask ident's home for what came after seq ``since`` of ``epoch`` (0: any)."""
    return _SUB.pack(SUB, fd, serial, since, epoch, flags, len(ident)) + ident


def read_sub(record):
    """(fd, serial, since, epoch, flags, id)"""
    _, fd, serial, since, epoch, flags, n = _SUB.unpack_from(record)
    return fd, serial, since, epoch, flags, record[_SUB.size:_SUB.size + n]


def msgs_header(fd, serial, last, epoch, flags, ident):
    """A MSGS record's start; each message follows as msg_header(seq, len) + data."""
    return _MSGS.pack(MSGS, fd, serial, last, epoch, flags, len(ident)) + ident


def msg_header(seq, length):
    return _MSG.pack(seq, length)


def read_msgs(record):
    """(fd, serial, last, epoch, flags, id, [(seq, data)])"""
    _, fd, serial, last, epoch, flags, n = _MSGS.unpack_from(record)
    ident = record[_MSGS.size:_MSGS.size + n]
    messages = []
    pos = _MSGS.size + n
    while pos < len(record):
        seq, n = _MSG.unpack_from(record, pos)
        pos += _MSG.size
        messages.append((seq, record[pos:pos + n]))
        pos += n
    return fd, serial, last, epoch, flags, ident, messages


def deliver(seq, epoch, flags, ident, data):
    return _DELIVER.pack(DELIVER, seq, epoch, flags, len(ident)) + ident + data


def read_deliver(record):
    """(seq, epoch, flags, id, data)"""
    _, seq, epoch, flags, n = _DELIVER.unpack_from(record)
    start = _DELIVER.size
    return seq, epoch, flags, record[start:start + n], record[start + n:]


def unsub(which, ident):
    return _UNSUB.pack(UNSUB, which, len(ident)) + ident


def read_unsub(record):
    """(which, id)"""
    _, which, n = _UNSUB.unpack_from(record)
    return which, record[_UNSUB.size:_UNSUB.size + n]


def cpoll(fd, serial, peek, ident):
    return _CPOLL.pack(CPOLL, fd, serial, peek, len(ident)) + ident


def read_cpoll(record):
    """(fd, serial, peek, id)"""
    _, fd, serial, peek, n = _CPOLL.unpack_from(record)
    return fd, serial, peek, record[_CPOLL.size:_CPOLL.size + n]


def cmsg(fd, serial, seq, taken, ident, data):
    return _CMSG.pack(CMSG, fd, serial, seq, taken, len(ident)) + ident + data


def read_cmsg(record):
    """(fd, serial, seq, taken, id, data)"""
    _, fd, serial, seq, taken, n = _CMSG.unpack_from(record)
    start = _CMSG.size
    return fd, serial, seq, taken, record[start:start + n], record[start + n:]


def cgive(seq, ident):
    return _CGIVE.pack(CGIVE, seq, len(ident)) + ident


def read_cgive(record):
    """(seq, id)"""
    _, seq, n = _CGIVE.unpack_from(record)
    return seq, record[_CGIVE.size:_CGIVE.size + n]


def cwake(ident):
    return _CWAKE.pack(CWAKE, len(ident)) + ident


def read_cwake(record):
    """id"""
    _, n = _CWAKE.unpack_from(record)
    return record[_CWAKE.size:_CWAKE.size + n]


def count_header(flags=0, generation=0):
    """A COUNT record's start; each id's entry (``count_entry``) follows."""
    return _COUNT.pack(COUNT, flags, generation)


def count_entry(ident, change):
    return _COUNT_ENTRY.pack(change, len(ident)) + ident


def read_count(record):
    """(flags, generation, [(id, change)])"""
    _, flags, generation = _COUNT.unpack_from(record)
    found = []
    pos = _COUNT.size
    end = len(record)
    while pos < end:
        change, n = _COUNT_ENTRY.unpack_from(record, pos)
        pos += _COUNT_ENTRY.size
        found.append((record[pos:pos + n], change))
        pos += n
    return flags, generation, found


def recount(generation):
    return _RECOUNT.pack(RECOUNT, generation)


def read_recount(record):
    """generation"""
    return _RECOUNT.unpack_from(record)[1]
