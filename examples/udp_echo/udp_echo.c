/* A tiny UDP echo server and its client: the "user's program" of the testing kit's example.
 *
 *   udp_echo serve PORT              echo every datagram back to its sender; one log line per datagram
 *   udp_echo send HOST PORT MESSAGE  send MESSAGE, print the reply; exit 0 if it came back unchanged
 *
 * The client sends again after a second without a reply (the first datagram may wait for ARP), five times
 * at most. Built static, it runs in the kit's busybox guest, which has no C library.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static int serve(int port)
{
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = INADDR_ANY};
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("udp_echo: bind");
        return 1;
    }
    printf("listening on udp port %d\n", port);
    fflush(stdout);
    for (;;) {
        char buf[65536];
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&peer, &len);
        if (n < 0)
            continue;
        sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, len);
        printf("echoed %zd bytes to %s:%d\n", n, inet_ntoa(peer.sin_addr), ntohs(peer.sin_port));
        fflush(stdout);
    }
}

static int send_one(const char *host, int port, const char *message)
{
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    struct timeval timeout = {.tv_sec = 1};
    size_t size = strlen(message);
    if (fd < 0 || inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "udp_echo: bad address %s\n", host);
        return 2;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    for (int attempt = 0; attempt < 5; attempt++) {
        char buf[65536];
        sendto(fd, message, size, 0, (struct sockaddr *)&addr, sizeof addr);
        ssize_t n = recv(fd, buf, sizeof buf - 1, 0);
        if (n < 0)
            continue;
        buf[n] = '\0';
        printf("%s\n", buf);
        return (size_t)n == size && memcmp(buf, message, size) == 0 ? 0 : 1;
    }
    fprintf(stderr, "udp_echo: no reply from %s:%d\n", host, port);
    return 1;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "serve") == 0)
        return serve(atoi(argv[2]));
    if (argc == 5 && strcmp(argv[1], "send") == 0)
        return send_one(argv[2], atoi(argv[3]), argv[4]);
    fprintf(stderr, "usage: udp_echo serve PORT | udp_echo send HOST PORT MESSAGE\n");
    return 2;
}
