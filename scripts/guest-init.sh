#!/bin/busybox sh
# /init of the lab's busybox guest (packed by scripts/guest-kernel, driven by vhostmap.lab.qemu).
#
# Kernel command line words it reads (N is the NIC index: eth0, eth1, ...; "ip"/"mtu" alone mean eth0):
#   vhostmap.ipN=ADDR/PREFIX   address of ethN        vhostmap.mtuN=BYTES   MTU of ethN
#   vhostmap.share=TAG         mount the 9p share TAG at /mnt/host
#   vhostmap.hugepages=N       reserve N 2 MiB hugepages and mount hugetlbfs at /dev/hugepages
#   vhostmap.cmd=TTY           the command channel (default ttyS1); the console (ttyS0) only logs
#
# Command channel protocol (one request at a time, host to guest, on a raw tty):
#   request:  "<id> <timeout-seconds> <length of the base64> <base64 of a sh script>\n"
#   reply:    "@@VHM-OUT <id> <length> <md5 of the output>@@\n" then exactly <length> bytes of the script's
#             stdout+stderr, then "@@VHM-RC <id> <exit status | timeout>@@\n"
#   The emulated UARTs have been seen to lose and to repeat bytes under TCG on a busy host, both ways:
#   - a request that arrives damaged (a field not a number, the base64 not of its length) is not run: the
#     reply is "@@VHM-BAD@@\n" and the host sends the request again;
#   - a reply the host finds damaged (its length or md5 do not match what came) makes the host send the same
#     request again: a request whose id is the last one run is not run again, its kept reply is sent again.
# The script runs in its own session with stdin from /dev/null; past its timeout its whole process group
# is killed and the status reads "timeout", so the channel stays usable. "@@VHM-READY@@" says the guest is up.

/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
exec < /dev/console > /dev/console 2>&1

say() { echo "vhostmap-guest: $*"; }

cmdline_value() { # cmdline_value KEY...: the value of the first KEY=VALUE word found on the command line
    for key in "$@"; do
        for word in $(cat /proc/cmdline); do
            case "$word" in "$key="*)
                echo "${word#*=}"
                return
                ;;
            esac
        done
    done
}

kv=$(uname -r)
while read -r module; do
    insmod "/lib/modules/$kv/$module" || say "insmod $module failed"
done < /etc/modules-load-order
# vfio-pci and the rest only on a guest with an IOMMU (scripts/guest-kernel, IOMMU_MODULES).
if grep -qw intel_iommu=on /proc/cmdline && [ -f /etc/modules-load-order-iommu ]; then
    while read -r module; do
        insmod "/lib/modules/$kv/$module" || say "insmod $module failed"
    done < /etc/modules-load-order-iommu
fi

ip link set lo up
n=0
while [ $n -lt 8 ]; do
    if [ $n -eq 0 ]; then
        addr=$(cmdline_value vhostmap.ip0 vhostmap.ip)
        mtu=$(cmdline_value vhostmap.mtu0 vhostmap.mtu)
    else
        addr=$(cmdline_value vhostmap.ip$n)
        mtu=$(cmdline_value vhostmap.mtu$n)
    fi
    dev=eth$n
    n=$((n + 1))
    if [ -z "$addr$mtu" ]; then
        # Unconfigured NICs still come up (for raw traffic) if they exist.
        [ -e /sys/class/net/$dev ] && ip link set $dev up
        continue
    fi
    # virtio_net probes during insmod, but give a slow TCG guest a moment anyway.
    tries=0
    while [ ! -e /sys/class/net/$dev ] && [ $tries -lt 50 ]; do
        usleep 100000
        tries=$((tries + 1))
    done
    [ -e /sys/class/net/$dev ] || {
        say "no $dev for vhostmap.ip/mtu"
        continue
    }
    [ -n "$mtu" ] && ip link set $dev mtu "$mtu"
    [ -n "$addr" ] && ip addr add "$addr" dev $dev
    ip link set $dev up
done

share=$(cmdline_value vhostmap.share)
if [ -n "$share" ]; then
    mount -t 9p -o trans=virtio,version=9p2000.L "$share" /mnt/host || say "cannot mount 9p share $share"
fi
hugepages=$(cmdline_value vhostmap.hugepages)
if [ -n "$hugepages" ]; then
    echo "$hugepages" > /proc/sys/vm/nr_hugepages
    mkdir -p /dev/hugepages
    mount -t hugetlbfs nodev /dev/hugepages
fi

run_one() { # run_one ID TIMEOUT BASE64: run one request and write its reply to stdout
    id=$1
    script=/tmp/vhm.$id.sh
    out=/tmp/vhm.$id.out
    flag=/tmp/vhm.$id.timeout
    if ! echo "$3" | base64 -d > $script 2> /dev/null; then
        echo "vhostmap-guest: undecodable request" > $out
        rc=254
    else
        # A session of its own, so the watchdog can kill the script and everything it started.
        setsid sh $script < /dev/null > $out 2>&1 &
        pid=$!
        # The flag goes first: once the script dies, this loop kills the watchdog at once.
        setsid sh -c "sleep $2; : > $flag; kill -9 -$pid" < /dev/null > /dev/null 2>&1 &
        watchdog=$!
        wait $pid
        rc=$?
        # The group if the watchdog has made its session yet, else the process itself.
        kill -9 -$watchdog $watchdog 2> /dev/null
        wait $watchdog 2> /dev/null
        [ -e $flag ] && rc=timeout
    fi
    # The reply is kept until the next request, for a host that asks again. A copy: background processes
    # the script left may still write to $out, which unlinking keeps harmless.
    cp $out $last_out
    echo "$rc" > $last_rc
    last_id=$id
    rm -f $script $out $flag
    reply
}

last_id=
last_out=/tmp/vhm.last.out
last_rc=/tmp/vhm.last.rc
reply() { # reply: write the reply of the last request run (protocol above)
    printf '@@VHM-OUT %s %s %s@@\n' "$last_id" "$(wc -c < $last_out)" "$(md5sum < $last_out | cut -c1-32)"
    cat $last_out
    printf '@@VHM-RC %s %s@@\n' "$last_id" "$(cat $last_rc)"
}

serve() {
    while read -r id timeout size payload; do
        case "$id.$timeout.$size" in
        *[!0-9.]* | .* | *..* | *.) printf '@@VHM-BAD@@\n' ;;
        *)
            if [ "${#payload}" != "$size" ]; then
                printf '@@VHM-BAD@@\n'
            elif [ "$id" = "$last_id" ]; then
                reply # the host saw its reply damaged: it asks again
            else
                run_one "$id" "$timeout" "$payload"
            fi
            ;;
        esac
    done
}

tty=/dev/$(cmdline_value vhostmap.cmd)
[ "$tty" = /dev/ ] && tty=/dev/ttyS1
exec 3<> $tty
# Raw: no echo, no CR/LF mangling, no line-length limit, no signals from bytes.
stty -F $tty raw -echo
say "ready ($(cut -d' ' -f1 /proc/uptime)s)"
printf '@@VHM-READY@@\n' >&3
while :; do
    serve <&3 >&3
done
